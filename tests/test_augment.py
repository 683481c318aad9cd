import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import chisquare
from torch.utils.data import DataLoader, Dataset

from synthgen.augment import PipelineGenerator, SynthAugment, SynthPolicy
from synthgen.errors import SynthgenError


class Tiles(Dataset):
    """Real Kather tiles (32 px) with an imbalanced label list: 60 / 12 / 6 items."""

    def __init__(self, kather, kind="uint8"):
        classes = sorted(p.name for p in kather.iterdir())[:3]
        self.images = [np.array(Image.open(next((kather / c).iterdir())).convert("RGB").resize((32, 32)))
                       for c in classes]
        self.labels = [0] * 60 + [1] * 12 + [2] * 6
        self.kind = kind

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[self.labels[i]]
        if self.kind == "pil":
            return Image.fromarray(img), self.labels[i]
        t = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        return (t.float() / 255 if self.kind == "float" else t), self.labels[i]


def flip_generator(labels, refs, seeds):
    """Stand-in for the pipeline in tests of the wrapper's bookkeeping: a flipped reference."""
    return refs.flip(-1)


def test_policy_balances_towards_the_largest_class():
    p = SynthPolicy.balance([0] * 60 + [1] * 12 + [2] * 6)
    assert p.ratios == {0: 0.0, 1: 3.0, 2: 3.0}  # 60/12 - 1 = 4 and 60/6 - 1 = 9, capped at 1:3
    assert SynthPolicy.balance([0] * 10 + [1] * 8).ratios[1] == pytest.approx(0.25)


def test_stream_class_frequencies_match_the_policy(kather):
    ds = SynthAugment(Tiles(kather), flip_generator, seed=1)
    assert ds.class_counts() == {0: (60, 0), 1: (12, 36), 2: (6, 18)}
    seen_labels, seen_synth = [], []
    for _ in range(5):  # five shuffled epochs
        for _images, labels, synthetic in DataLoader(ds, batch_size=16, shuffle=True):
            seen_labels += labels.tolist()
            seen_synth += synthetic.tolist()
    counts = np.bincount(seen_labels, minlength=3)
    expected = np.array([60, 48, 24]) / 132 * len(seen_labels)
    assert chisquare(counts, expected).pvalue > 0.01
    synth_share = [np.mean([s for y, s in zip(seen_labels, seen_synth, strict=True) if y == c]) for c in range(3)]
    assert synth_share == pytest.approx([0.0, 0.75, 0.75])


def test_image_types_are_preserved(kather):
    for kind, check in (("pil", lambda x: isinstance(x, Image.Image)),
                        ("float", lambda x: x.dtype == torch.float32 and x.max() <= 1),
                        ("uint8", lambda x: x.dtype == torch.uint8)):
        ds = SynthAugment(Tiles(kather, kind), flip_generator)
        real, synth = ds[0], ds[len(ds) - 1]
        assert check(real[0]) and check(synth[0]) and real[2] is False and synth[2] is True


def test_unexpected_items_fail_clearly():
    class Bad(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return "not an image"

    with pytest.raises(SynthgenError, match="expected \\(image, label\\)"):
        SynthAugment(Bad(), flip_generator)

    class WithMasks(Bad):
        def __getitem__(self, i):
            return torch.zeros(3, 8, 8, dtype=torch.uint8), 0, torch.zeros(8, 8)

    with pytest.raises(SynthgenError, match="mask"):
        SynthAugment(WithMasks(), flip_generator)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from synthgen.encoders.ssl import SSLEncoder
    from synthgen.models.denoiser import Denoiser
    from synthgen.models.presets import denoiser_config, encoder_config
    from synthgen.models.vae import VAE
    from synthgen.pipelines.generate import SynthPipeline
    from synthgen.pipelines.sampling import make_scheduler

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("aug") / "pipe"
    SynthPipeline(Denoiser(**denoiser_config("tiny")).eval(), VAE.from_preset("tiny").model.eval(),
                  make_scheduler("epsilon"), image_encoder=SSLEncoder(**encoder_config("tiny")).eval()
                  ).save_pretrained(folder)
    return folder


def test_real_pipeline_deterministic_across_worker_counts(kather, tiny_pipeline):
    gen = PipelineGenerator(tiny_pipeline, mode="variation", num_inference_steps=3)
    ds = SynthAugment(Tiles(kather), gen, seed=7)

    def run(workers):
        loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(0), persistent_workers=workers > 0)
        out = [(x, y, s) for x, y, s in loader]
        del loader
        return out

    a, b = run(0), run(2)
    for (xa, ya, sa), (xb, yb, sb) in zip(a, b, strict=True):
        assert torch.equal(ya, yb) and torch.equal(sa, sb) and torch.equal(xa, xb)
    synth = torch.cat([x[s] for x, _, s in a])
    assert len(synth) == 54 and synth.dtype == torch.uint8 and synth.float().std() > 1
