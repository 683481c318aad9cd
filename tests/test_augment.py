from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from synthgen.augment import PipelineGenerator, SynthAugment, SynthPolicy
from synthgen.errors import SynthgenError


class Tiles(Dataset):
    """Real Kather tiles (32 px, or ``size``) with an imbalanced label list: 60 / 12 / 6 items."""

    def __init__(self, kather, kind="uint8", size=32):
        classes = sorted(p.name for p in kather.iterdir())[:3]
        self.images = [np.array(Image.open(next((kather / c).iterdir())).convert("RGB").resize((size, size)))
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
    from scipy.stats import chisquare

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
    from synthgen.sampling import make_scheduler

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("aug") / "pipe"
    SynthPipeline(Denoiser(**denoiser_config("tiny")).eval(), VAE.from_preset("tiny").model.eval(),
                  make_scheduler("epsilon"), image_encoder=SSLEncoder(**encoder_config("tiny")).eval()
                  ).save_pretrained(folder)
    return folder


def test_real_pipeline_deterministic_across_worker_counts(kather, tiny_pipeline):
    gen = PipelineGenerator(tiny_pipeline, mode="variations", num_inference_steps=3)
    ds = SynthAugment(Tiles(kather), gen, seed=7)

    def run(workers):
        loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(0), persistent_workers=workers > 0)
        out = [(x, y, s) for x, y, s in loader]
        del loader
        return out

    a, b = run(0), run(2)
    for (xa, ya, sa), (xb, yb, sb) in zip(a, b, strict=True):
        # same items, labels and synthetic flags; pixels equal up to float rounding (workers run torch
        # on 1 thread, the main process on all cores, and the untrained model's clipped x0 estimates
        # turn last-bit differences into a grey level here and there)
        assert torch.equal(ya, yb) and torch.equal(sa, sb)
        diff = (xa.int() - xb.int()).abs()
        assert diff.float().mean() < 0.05 and diff.max() <= 8, (diff.float().mean(), diff.max())
    synth = torch.cat([x[s] for x, _, s in a])
    assert len(synth) == 54 and synth.dtype == torch.uint8 and synth.float().std() > 1
    # device=: the pipeline is moved there once loaded; images come back on the CPU, same cache key
    on = PipelineGenerator(tiny_pipeline, mode="variations", num_inference_steps=3, device="cpu")
    refs = torch.stack([Tiles(kather)[i][0] for i in range(2)])
    assert torch.equal(on([0, 1], refs, [3, 4]), gen([0, 1], refs, [3, 4]))
    assert on._pipe.device == torch.device("cpu") and on.fingerprint() == gen.fingerprint()


CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "synthgen-small-cmu"


def seeded_generator(labels, refs, seeds):
    """Deterministic stand-in whose output depends on each item's seed (and nothing else of the batch)."""
    noise = torch.stack([torch.randint(0, 40, refs.shape[1:], generator=torch.Generator().manual_seed(s))
                         for s in seeds])
    return (refs.int() + noise).clamp(0, 255).to(torch.uint8)


class CountingGenerator:
    """seeded_generator that counts the images it makes; ``tag`` stands for its sampling settings."""

    def __init__(self, tag="a"):
        self.tag, self.calls = tag, 0

    def fingerprint(self):
        return f"counting-{self.tag}"

    def __call__(self, labels, refs, seeds):
        self.calls += len(seeds)
        return seeded_generator(labels, refs, seeds)


def test_prior_mode_gives_the_requested_classes_at_the_policy_rate(kather):
    tiles = Tiles(kather, size=64)  # classes 01_TUMOR, 02_STROMA, 03_COMPLEX (ImageFolder names)
    names = sorted(p.name for p in kather.iterdir())[:3]
    gen = PipelineGenerator(CKPT, mode="prior", classes=names, num_inference_steps=1)
    prior_names = ["ADIPOSE", "COMPLEX", "DEBRIS", "EMPTY", "LYMPHO", "MUCOSA", "STROMA", "TUMOR"]
    assert gen.class_map == {0: prior_names.index("TUMOR"), 1: prior_names.index("STROMA"),
                             2: prior_names.index("COMPLEX")}
    assert PipelineGenerator(CKPT, mode="prior", classes={0: "tumor", 2: 1}).class_map == {0: 7, 2: 1}

    ds = SynthAugment(tiles, gen, SynthPolicy({1: 1.0, 2: 2.0}), seed=3)
    assert ds.class_counts() == {0: (60, 0), 1: (12, 12), 2: (6, 12)}
    gen._pipeline()  # loads the prior; record the prior classes it is asked for
    asked, sample = [], gen._prior.sample
    gen._prior.sample = lambda labels, **kw: (asked.extend(labels), sample(labels, **kw))[1]
    seen = {0: [0, 0], 1: [0, 0], 2: [0, 0]}  # class -> [real, synthetic]
    synth = []
    for images, labels, synthetic in DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)):
        for x, y, s in zip(images, labels.tolist(), synthetic.tolist(), strict=True):
            seen[y][int(s)] += 1
            if s:
                synth.append((y, x))
    assert seen == {0: [60, 0], 1: [12, 12], 2: [6, 12]}
    assert sorted(asked) == [prior_names.index("COMPLEX")] * 12 + [prior_names.index("STROMA")] * 12
    assert all(x.dtype == torch.uint8 and x.shape == (3, 64, 64) for _, x in synth)  # the model's 64 px tiles
    # every item its own prior draw and noise: no two alike (the real items of a class are one tile)
    stack = torch.stack([x for _, x in synth]).float()
    assert torch.cdist(stack.flatten(1), stack.flatten(1)).add(torch.eye(len(stack)) * 1e9).min() > 100
    # item k is the same alone or in another batch (the prior draws per item, from the item's seed)
    k = len(ds) - 1
    alone, in_batch = ds[k][0], ds.__getitems__([len(ds) - 5, k])[1][0]
    assert (alone.int() - in_batch.int()).abs().max() <= 1

    with pytest.raises(SynthgenError, match="matches no class of the prior.*TUMOR"):
        PipelineGenerator(CKPT, mode="prior", classes=["tumour"])
    with pytest.raises(SynthgenError, match="prior mode needs classes="):
        PipelineGenerator(CKPT, mode="prior")
    with pytest.raises(SynthgenError, match="makes 64x64 images but the dataset's are 32x32"):
        SynthAugment(Tiles(kather), gen)[len(tiles)]
    with pytest.raises(SynthgenError, match=r"class\(es\) \[2\] have no class of the prior"):
        SynthAugment(tiles, PipelineGenerator(CKPT, mode="prior", classes={1: "STROMA"}), SynthPolicy({2: 1.0}))


@pytest.fixture(scope="module")
def cmu_pairs(cmu):
    """Held-out (right third) 64 px tiles of the CMU slide at 1 um/px with their nuclei pseudo-label masks."""
    from synthgen.data import Slide
    from synthgen.data.nuclei import segment_nuclei
    from synthgen.data.tiling import TileSpec, tile_slide

    with Slide(cmu) as s:
        tiles = tile_slide(s, TileSpec(mpp=1.0, size=64, min_tissue=0.8, roi=(0.67, 0, 1, 1)), key="cmu")
        pairs = [(img, segment_nuclei(img)) for img in (s.read(t.x, t.y, 64, 1.0) for t in tiles[:60])]
    return [(torch.from_numpy(img).permute(2, 0, 1).contiguous(), torch.from_numpy(m))
            for img, m in pairs if m.max() >= 5][:10]


class Pairs(Dataset):
    """(image, label, mask): 6 items of class 0, 4 of class 1."""

    def __init__(self, pairs, as_dict=False):
        self.pairs, self.as_dict = pairs, as_dict

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        img, m = self.pairs[i]
        label = int(i >= 6)
        return {"image": img, "label": label, "mask": m} if self.as_dict else (img, label, m)


def test_mask_mode_keeps_the_samples_mask_and_follows_it(cmu_pairs):
    from synthgen.data.nuclei import segment_nuclei
    from synthgen.metrics.masks import dice

    assert len(cmu_pairs) == 10
    gen = PipelineGenerator(CKPT, mode="mask", num_inference_steps=4)
    ds = SynthAugment(Pairs(cmu_pairs), gen, SynthPolicy({1: 2.0}), seed=5)
    assert ds.class_counts() == {0: (6, 0), 1: (4, 8)}
    synth = ds.__getitems__(list(range(10, 18)))
    own, other = [], []
    for k, (img, label, mask, synthetic) in enumerate(synth):
        ref = ds.synthetic[k][1]
        assert synthetic is True and label == 1 and 6 <= ref < 10
        assert mask is cmu_pairs[ref][1]  # the sample's own mask, untouched
        assert img.dtype == torch.uint8 and img.shape == (3, 64, 64) and not torch.equal(img, cmu_pairs[ref][0])
        pred = segment_nuclei(img.numpy())
        own.append(dice(pred, mask.numpy()))
        other.append(dice(pred, cmu_pairs[(ref - 6 + 1) % 4 + 6][1].numpy()))  # another rare item's mask
    # nuclei where the item's mask says, far more than where another mask says (measured: ~0.4 vs ~0.05)
    assert np.mean(own) > 0.25 and np.mean(own) > np.mean(other) + 0.15, (own, other)
    # dict items keep their mask too, and the real items are unchanged
    dds = SynthAugment(Pairs(cmu_pairs, as_dict=True), gen, SynthPolicy({1: 0.5}), seed=5)
    item = dds[len(dds) - 1]
    assert item["synthetic"] is True and item["mask"] is cmu_pairs[dds.synthetic[-1][1]][1]
    assert dds[0]["synthetic"] is False and dds[0]["image"] is cmu_pairs[0][0]

    with pytest.raises(SynthgenError, match="mask-guided but the dataset returns no masks"):
        SynthAugment(_NoMasks(cmu_pairs), gen)
    with pytest.raises(SynthgenError, match="mode='mask'"):
        SynthAugment(Pairs(cmu_pairs), PipelineGenerator(CKPT, mode="variations"))


class _NoMasks(Pairs):
    def __getitem__(self, i):
        return super().__getitem__(i)[:2]


def test_disk_cache_reuses_items_and_keeps_other_settings_apart(kather, tmp_path):
    from synthgen.errors import CacheError

    gen = CountingGenerator()
    ds = SynthAugment(Tiles(kather), gen, seed=1, cache_dir=tmp_path)

    first = {k: ds[k][0] for k in range(78, len(ds))}
    assert gen.calls == 54
    again = SynthAugment(Tiles(kather), gen, seed=1, cache_dir=tmp_path)
    second = {k: again[k][0] for k in range(78, len(again))}
    assert gen.calls == 54  # all from disk
    assert all(torch.equal(first[k], second[k]) for k in first)
    nocache = SynthAugment(Tiles(kather), CountingGenerator(), seed=1)
    assert all(torch.equal(first[k], nocache[k][0]) for k in first)  # same items as without the cache
    # a DataLoader with workers reads the same files
    batches = list(DataLoader(again, batch_size=16, num_workers=2))
    assert gen.calls == 54 and torch.equal(torch.cat([b[0] for b in batches])[78:], torch.stack(list(first.values())))

    # other settings (generator, seed) go to their own folder and never read these items
    for other in (SynthAugment(Tiles(kather), CountingGenerator("b"), seed=1, cache_dir=tmp_path),
                  SynthAugment(Tiles(kather), CountingGenerator(), seed=2, cache_dir=tmp_path)):
        assert other.cache.dir != ds.cache.dir
        assert other.pregenerate() == 54 and other.generator.calls == 54 and other.pregenerate() == 0
    assert len(list(tmp_path.iterdir())) == 3
    # a folder whose record disagrees with its name is refused
    (ds.cache.dir / "settings.json").write_text('{"generator": "tampered"}')
    with pytest.raises(CacheError, match="other settings"):
        SynthAugment(Tiles(kather), gen, seed=1, cache_dir=tmp_path)
    # the pipeline generator's key covers its model files and sampling settings
    a = PipelineGenerator(CKPT, mode="variations", num_inference_steps=8)
    assert a.fingerprint() == PipelineGenerator(CKPT, mode="variations", num_inference_steps=8).fingerprint()
    assert a.fingerprint() != PipelineGenerator(CKPT, mode="variations", num_inference_steps=4).fingerprint()


def _ddp_rank(rank, kather, cache_dir, out):
    """One of two gloo processes: fill the shared cache with this rank's share, then read it."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.utils.data.distributed import DistributedSampler

    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    ds = SynthAugment(Tiles(kather), CountingGenerator(), seed=4, cache_dir=cache_dir)
    sampler = DistributedSampler(ds, shuffle=True, seed=9)
    sampler.set_epoch(1)
    share = list(sampler)
    made = ds.pregenerate(share)
    images = torch.cat([x for x, _, _ in DataLoader(ds, batch_size=8, sampler=sampler)])
    dist.barrier()
    save_file({"indices": torch.tensor(share), "images": images, "made": torch.tensor([made, ds.generator.calls])},
              f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()


def test_two_gloo_processes_each_get_their_own_share(kather, tmp_path):
    """Under DDP each rank's DistributedSampler share holds the items a single process gives for
    those indices (item k depends on (seed, k) only), each rank generates only its own share, and
    both fill one cache without clashing."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    # spawn, not fork: a fork of a process whose torch thread pools have run can deadlock
    mp.start_processes(_ddp_rank, args=(kather, tmp_path / "cache", tmp_path), nprocs=2, start_method="spawn")
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    single = SynthAugment(Tiles(kather), CountingGenerator(), seed=4)
    shares = [set(r["indices"].tolist()) for r in ranks]
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(range(len(single)))
    for r in ranks:
        assert torch.equal(r["images"], torch.stack([single[k][0] for k in r["indices"].tolist()]))
        n_synth = int(single.is_synthetic[r["indices"].numpy()].sum())
        assert r["made"].tolist() == [n_synth, n_synth]  # generated its own synthetic items once, then read them
    assert len(list((tmp_path / "cache").glob("*/*.safetensors"))) == len(single.synthetic)


class LoggingGenerator:
    """seeded_generator that leaves a file ``<pid>-<seed>`` in ``log`` per image it makes (so a test
    sees which process generated what, across DataLoader workers and the background process), and
    takes ``delay`` seconds per image (a slow model); ``fail`` makes it raise instead."""

    def __init__(self, log, delay=0.0, fail=False):
        self.log, self.delay, self.fail = Path(log), delay, fail

    def fingerprint(self):
        return "logging"

    def __call__(self, labels, refs, seeds):
        import os
        import time

        if self.fail:
            raise RuntimeError("the model ran out of memory")
        time.sleep(self.delay * len(seeds))
        for s in seeds:
            (self.log / f"{os.getpid()}-{s}").touch()
        return seeded_generator(labels, refs, seeds)


def _made_by(log):
    """seed -> pids of the processes that generated it."""
    out = {}
    for f in log.iterdir():
        pid, seed = f.name.split("-")
        out.setdefault(int(seed), []).append(int(pid))
    return out


def test_background_fill_runs_while_a_loader_reads_the_cache(kather, tmp_path):
    """The background process fills the cache while a 2-worker loader iterates: the workers read
    what is already there (never regenerating it) and generate only the misses; every item is the
    one the synchronous path gives for the seed."""
    import time

    log = tmp_path / "log"
    log.mkdir()
    ds = SynthAugment(Tiles(kather), LoggingGenerator(log, delay=0.05), seed=6, cache_dir=tmp_path / "cache")
    reference = SynthAugment(Tiles(kather), seeded_generator, seed=6)  # no cache, generated in the foreground
    seeds = [s for _, _, s in ds.synthetic]
    order = list(range(len(ds)))[::-1]  # synthetic items first, as the loader below asks for them
    with ds.pregenerate(order, batch_size=4, background=True) as fill:
        assert fill.keys == list(range(len(ds.synthetic)))[::-1] and fill.running()
        deadline = time.time() + 120
        while fill.cached() < 8 and time.time() < deadline:
            time.sleep(0.05)
        before = {s for k, s in enumerate(seeds) if ds.cache.path(6, k).exists()}
        assert len(before) >= 8, "the background process made nothing in 2 minutes"
        batches = list(DataLoader(ds, batch_size=6, sampler=order[:54], num_workers=2))
        assert fill.wait(120) is not None
    made = _made_by(log)
    images = torch.cat([b[0] for b in batches])
    assert torch.equal(images, torch.stack([reference[i][0] for i in order[:54]]))
    assert torch.cat([b[2] for b in batches]).all()
    assert set(made) == set(seeds) and all(ds.cache.path(6, k).exists() for k in range(len(seeds)))
    workers = {p for pids in made.values() for p in pids} - {fill.pid}
    by_background = {s for s, pids in made.items() if fill.pid in pids}
    assert len(by_background) == fill.made >= len(before)
    # the workers generated none of the items that were on disk when the loader started
    assert not any(set(made[s]) & workers for s in before)
    assert not list(ds.cache.dir.glob(".*tmp*"))  # no half-written files left behind


def test_background_fill_matches_synchronous_pipeline_items(kather, tiny_pipeline, tmp_path):
    gen = PipelineGenerator(tiny_pipeline, mode="variations", num_inference_steps=3)
    policy = SynthPolicy({1: 0.5, 2: 1.0})  # 12 synthetic items
    sync = SynthAugment(Tiles(kather), gen, policy, seed=2, cache_dir=tmp_path / "sync")
    back = SynthAugment(Tiles(kather), gen, policy, seed=2, cache_dir=tmp_path / "back")
    assert sync.pregenerate(batch_size=8) == 12
    with back.pregenerate(batch_size=8, background=True) as fill:
        assert fill.wait(300) == 12 and fill.cached() == 12
    for k in range(12):
        assert torch.equal(sync.cache.get(2, k), back.cache.get(2, k)), k


def test_background_fill_stops_and_reports_errors(kather, tmp_path):
    import time

    log = tmp_path / "log"
    log.mkdir()
    ds = SynthAugment(Tiles(kather), LoggingGenerator(log, delay=0.2), seed=1, cache_dir=tmp_path / "a")
    fill = ds.pregenerate(batch_size=2, background=True)
    deadline = time.time() + 120
    while fill.cached() < 2 and time.time() < deadline:
        time.sleep(0.05)
    made = fill.stop()  # after the batch under way (0.4 s), well before the 54 items (11 s)
    assert not fill.running() and 2 <= made < 54 and made == fill.cached() == len(list(log.iterdir()))

    bad = SynthAugment(Tiles(kather), LoggingGenerator(log, fail=True), seed=1, cache_dir=tmp_path / "b")
    with pytest.raises(SynthgenError, match="background=True\\) failed:(.|\n)*ran out of memory"):
        with bad.pregenerate(background=True) as fill:
            fill.wait(120)
    with pytest.raises(SynthgenError, match="must be picklable"):
        SynthAugment(Tiles(kather), lambda labels, refs, seeds: refs, cache_dir=tmp_path / "c").pregenerate(
            background=True)
    with pytest.raises(SynthgenError, match="needs cache_dir"):
        SynthAugment(Tiles(kather), seeded_generator).pregenerate(background=True)
