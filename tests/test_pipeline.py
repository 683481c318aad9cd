import numpy as np
import pytest
import torch

from synthgen.encoders.ssl import SSLEncoder
from synthgen.models.denoiser import Denoiser
from synthgen.models.presets import denoiser_config, encoder_config
from synthgen.models.vae import VAE
from synthgen.pipelines.generate import SynthPipeline
from synthgen.sampling import make_scheduler


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """Tiny components saved and reloaded as one pipeline folder (8x8x4 latents -> 32 px images)."""
    torch.manual_seed(0)
    p = SynthPipeline(transformer=Denoiser(**denoiser_config("tiny", num_classes=3)).eval(),
                      vae=VAE.from_preset("tiny").model.eval(), scheduler=make_scheduler("epsilon"),
                      image_encoder=SSLEncoder(**encoder_config("tiny")).eval())
    folder = tmp_path_factory.mktemp("pipe") / "pipeline"
    p.save_pretrained(folder)
    loaded = SynthPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def _cond(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"embeddings": torch.randn(n, 1, 32, generator=g), "class_labels": torch.arange(n) % 3}


def test_round_trip_folder(pipe):
    assert isinstance(pipe.transformer, Denoiser) and isinstance(pipe.image_encoder, SSLEncoder)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"


def test_seeds_reproduce_and_differ(pipe):
    c = _cond()
    a = pipe(**c, seeds=[1, 2, 3], num_inference_steps=5, output_type="pt").images
    b = pipe(**c, seeds=[1, 2, 3], num_inference_steps=5, output_type="pt").images
    d = pipe(**c, seeds=[4, 5, 6], num_inference_steps=5, output_type="pt").images
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert (a.float() - d.float()).abs().mean() > 1


def test_mixed_batch_equals_one_by_one(pipe):
    c = _cond(4)
    batch = pipe(**c, seeds=[10, 11, 12, 13], num_inference_steps=5, output_type="latent").images
    for i in range(4):
        one = pipe(embeddings=c["embeddings"][i : i + 1], class_labels=c["class_labels"][i : i + 1],
                   seeds=[10 + i], num_inference_steps=5, output_type="latent").images
        torch.testing.assert_close(one[0], batch[i], rtol=1e-4, atol=1e-4)
    # the result does not depend on how the work is split into batches
    split = pipe(**c, seeds=[10, 11, 12, 13], num_inference_steps=5, output_type="latent", batch_size=3).images
    torch.testing.assert_close(split, batch, rtol=1e-4, atol=1e-4)


def test_guidance_one_is_the_conditional_model(pipe):
    """Scale 1 reproduces a hand-written loop that only ever calls the conditional model (the
    loop does not clip the denoised estimate, so neither does the pipeline here)."""
    c = _cond(2)
    out = pipe(**c, seeds=[7, 8], num_inference_steps=6, guidance_scale=1.0, output_type="latent",
               clip_denoised=None, dtype="fp32").images  # the hand-written loop below runs in fp32
    model, sched = pipe.transformer, make_scheduler("epsilon")
    x = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (7, 8)])
    sched.set_timesteps(6)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = model(x, t.expand(2), **c).sample
            x = sched.step(eps, t, x).prev_sample
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    guided = pipe(**c, seeds=[7, 8], num_inference_steps=6, guidance_scale=3.0, output_type="latent",
                  clip_denoised=None).images
    assert (guided - out).abs().mean() > 1e-3


def test_reference_images_and_output_types(pipe, kather):
    from PIL import Image

    tiles = [Image.open(p).convert("RGB").resize((32, 32)) for p in sorted((kather / "01_TUMOR").iterdir())[:2]]
    out = pipe(images=tiles, class_labels=[0, 0], num_images_per_condition=2, num_inference_steps=4)
    assert len(out.images) == 4 and out.images[0].size == (32, 32) and out.seeds == [0, 1, 2, 3]
    arr = pipe(images=tiles, class_labels=[0, 0], num_inference_steps=4, output_type="np").images
    assert arr.shape == (2, 32, 32, 3) and arr.dtype == np.uint8
    for sampler in ("ddim", "euler"):
        assert pipe(**_cond(1), sampler=sampler, num_inference_steps=4, output_type="pt").images.shape == (1, 3, 32, 32)


def test_condition_errors(pipe):
    # a condition not given is its learned null, the same as asking for it explicitly
    emb = torch.randn(2, 1, 32)
    implicit = pipe(embeddings=emb, num_inference_steps=2, output_type="pt").images
    assert torch.equal(implicit, pipe(embeddings=emb, class_labels=[-1, -1], num_inference_steps=2, output_type="pt").images)
    with pytest.raises(ValueError, match="give at least one condition"):
        pipe(num_inference_steps=2)
    with pytest.raises(ValueError, match="NaN"):
        pipe(embeddings=torch.full((1, 1, 32), float("nan")), class_labels=[0])
    with pytest.raises(ValueError, match="class_labels has 3 entries but the other conditions have 2"):
        pipe(embeddings=torch.randn(2, 1, 32), class_labels=[0, 1, 2])
    with pytest.raises(ValueError, match="2 seeds for 4 images"):
        pipe(**_cond(2), num_images_per_condition=2, seeds=[1, 2])
    with pytest.raises(ValueError, match="not conditioned on text"):
        pipe(**_cond(1), prompts=["tumour"])
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe(**_cond(1), sampler="plms")


def test_guidance_interval_skips_unconditional_passes(pipe):
    """Outside the interval only the conditional model runs: an empty interval equals scale 1."""
    c = _cond(2)
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k: calls.append(a[0].shape[0]))
    try:
        pipe(**c, seeds=[1, 2], num_inference_steps=10, guidance_scale=3.0, guidance_interval=(0.2, 0.8),
             output_type="latent")
    finally:
        hook.remove()
    assert calls.count(4) == 6 and calls.count(2) == 4  # positions 2/9..7/9 guided (batched 2x), 4 unguided
    none = pipe(**c, seeds=[1, 2], num_inference_steps=6, guidance_scale=3.0, guidance_interval=(2.0, 3.0),
                output_type="latent").images
    plain = pipe(**c, seeds=[1, 2], num_inference_steps=6, guidance_scale=1.0, output_type="latent").images
    torch.testing.assert_close(none, plain)
