import pytest
import torch
from PIL import Image
from tiny_encoders import color_tokens

from synthgen.models.prior import EmbeddingPrior
from synthgen.pipelines.rare import ClassFilter, RareClassSynthesizer, interpolate_embeddings


@pytest.fixture(scope="module")
def bank(kather):
    """Real embeddings: 16 random 64 px crops of each of the 24 Kather tiles (8 classes)."""
    g = torch.Generator().manual_seed(0)
    enc = color_tokens()
    embs, labels = [], []
    for label, cls in enumerate(sorted(p.name for p in kather.iterdir())):
        for path in sorted((kather / cls).iterdir()):
            img = torch.from_numpy(__import__("numpy").array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
            for _ in range(16):
                y, x = torch.randint(0, 150 - 64, (2,), generator=g).tolist()
                crop = img[:, y : y + 64, x : x + 64]
                embs.append(enc(crop[None])[0])
                labels.append(label)
    return torch.stack(embs), torch.tensor(labels)


def test_prior_samples_match_their_class(bank):
    embs, labels = bank
    torch.manual_seed(0)
    prior = EmbeddingPrior(num_tokens=4, dim=8, num_classes=8, width=128, depth=2)
    prior.fit_normalization(embs)
    opt = torch.optim.Adam(prior.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        idx = torch.randint(0, len(embs), (64,), generator=g)
        loss = prior.loss(embs[idx], labels[idx], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sl = torch.arange(8).repeat_interleave(40)
    samples = prior.sample(sl, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (320, 4, 8)

    def energy(a, b):  # energy distance between two samples (Szekely & Rizzo)
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        return 2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()

    # for every class, of the 8 sample sets, the one drawn for that class is the closest to its real embeddings
    for c in range(8):
        d = torch.stack([energy(embs[labels == c], samples[sl == k]) for k in range(8)])
        assert int(d.argmin()) == c, (c, d)
    # a nearest-centroid classifier fitted on the real bank recognises the samples as well as real data
    f = ClassFilter(embs, labels)
    real_acc = (f.predict(embs) == labels).float().mean()
    assert (f.predict(samples) == sl).float().mean() >= real_acc - 0.1
    with pytest.raises(ValueError, match="labels must be < num_classes"):
        prior.sample(torch.tensor([8]))


def test_prior_round_trip(tmp_path, bank):
    embs, _ = bank
    prior = EmbeddingPrior(num_tokens=4, dim=8, num_classes=8, width=32, depth=1)
    prior.fit_normalization(embs)
    prior.save_pretrained(tmp_path / "p")
    loaded = EmbeddingPrior.from_pretrained(tmp_path / "p")
    assert torch.equal(loaded.mean, prior.mean) and torch.equal(loaded.std, prior.std)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(prior.sample([0, 5], g1, num_steps=5), loaded.sample([0, 5], g2, num_steps=5))


def test_interpolation_stays_between_neighbours(bank):
    embs, labels = bank
    own = embs[labels == 3]
    mixed = interpolate_embeddings(own, 50, torch.Generator().manual_seed(0))
    assert mixed.shape == (50, 4, 8)
    lo, hi = own.reshape(len(own), -1).min(0).values, own.reshape(len(own), -1).max(0).values
    flat = mixed.reshape(50, -1)
    assert ((flat >= lo - 1e-6) & (flat <= hi + 1e-6)).all()  # convex mixtures never leave the class's box
    assert not any(torch.equal(m, o) for m in mixed for o in own)
    with pytest.raises(ValueError, match="at least 2"):
        interpolate_embeddings(own[:1], 3, torch.Generator())


def test_filter_on_planted_embeddings(bank):
    embs, labels = bank
    f = ClassFilter(embs, labels)
    own = embs[labels == 3][:10]  # lymphocytes: dense dark nuclei, well apart from the rest in colour
    assert f.accept(own, [3] * 10).float().mean() >= 0.8
    assert f.accept(own, [6] * 10).float().mean() <= 0.2  # the same embeddings claimed as adipose


def test_synthesizer_modes_end_to_end(bank):
    """A tiny embedding-conditioned pipeline driven in each mode; the filter reports a rate."""
    from synthgen.models.denoiser import Denoiser
    from synthgen.models.presets import denoiser_config
    from synthgen.models.vae import VAE
    from synthgen.pipelines.generate import SynthPipeline
    from synthgen.sampling import make_scheduler

    embs, labels = bank
    torch.manual_seed(0)
    pipe = SynthPipeline(Denoiser(**denoiser_config("tiny", caption_channels=8, caption_num_tokens=4)).eval(),
                         VAE.from_preset("tiny").model.eval(), make_scheduler("epsilon"))
    pipe.set_progress_bar_config(disable=True)
    prior = EmbeddingPrior(num_tokens=4, dim=8, num_classes=8, width=32, depth=1)
    prior.fit_normalization(embs)
    enc = color_tokens()
    synth = RareClassSynthesizer(pipe, embs, labels, prior=prior, image_encoder=enc)
    for mode in ("variations", "prior", "interpolation"):
        res = synth.generate(4, 3, mode=mode, num_inference_steps=3, seed=1)
        assert len(res.images) == 3 and res.images[0].size == (32, 32) and res.mode == mode
        assert 0.0 <= res.acceptance_rate <= 1.0 and res.accepted.shape == (3,)
    again = synth.generate(4, 3, mode="variations", num_inference_steps=3, seed=1)
    assert torch.equal(again.conditions, synth.generate(4, 3, mode="variations", num_inference_steps=3, seed=1).conditions)
    with pytest.raises(ValueError, match="unknown mode"):
        synth.generate(4, 2, mode="gan")
