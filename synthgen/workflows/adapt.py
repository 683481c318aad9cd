"""``synthgen adapt``: fine-tune a pipeline on a user's labelled tiles, all classes at once.

A lab's rare class is only useful synthetically if it carries the same generator look as its
common classes; so the denoiser is fine-tuned on every class of the user's dataset, with the
dataset's class names as its class vocabulary, and the pipeline's embedding bank and prior are
rebuilt from the dataset. The adapted pipeline then generates a class by name
(``synthgen generate OUT --class NAME``) with no other files.

Steps, each kept in the work folder (``OUT`` beside it as ``.OUT.adapt/``) so an interrupted run
resumes where it stopped: the user's images cut into the model's tiles at its scale
(``tiles/CLASS/*.png``), their latents and embeddings cached (in 8 dihedral views), the
denoiser fine-tuned (``task: denoiser``, resumable checkpoints), the prior trained, and the
pipeline written at once (nothing partial at ``OUT``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from synthgen.errors import SynthgenError

DEFAULT_BASE = Path(__file__).resolve().parents[2] / "checkpoints" / "synthgen-v2"
_REPLACED = ("transformer", "fast_transformer", "fast_scheduler", "bank", "prior")  # rebuilt or no longer valid


@dataclass
class AdaptJob:
    """What ``synthgen adapt`` does.

    ``dataset``: an ImageFolder (one sub-folder of images per class) or a CSV ``path,label``.
    ``image_mpp``: the images' resolution (um/px); they are resampled to the pipeline's and cut
    into its tiles. Without it every image must already be one tile of the model (its size at its
    scale). ``steps``: denoiser fine-tuning steps (full fine-tune, all classes); ``prior_steps``:
    the embedding prior's.
    """

    dataset: Path
    out: Path
    pipeline: Path = DEFAULT_BASE
    steps: int = 300
    image_mpp: float | None = None
    prior_steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-5
    dihedral: bool = True
    seed: int = 0
    work_dir: Path | None = None

    @property
    def work(self) -> Path:
        out = Path(self.out)
        return Path(self.work_dir) if self.work_dir else out.parent / f".{out.name}.adapt"


def adapt(job: AdaptJob, progress: bool = True) -> dict:
    """Run ``job``; returns its summary (also written as ``OUT/adapt.json``).

    Raises:
        SynthgenError: a base that is not a class-capable pipeline, a dataset with an empty
            class, unreadable images, or images not at the model's scale without ``image_mpp``.
    """
    from synthgen._io import atomic_dir, atomic_write_text
    from synthgen.loading import check_pipeline_folder

    base, out, work = Path(job.pipeline), Path(job.out), job.work
    if job.steps < 1 or job.prior_steps < 1:
        raise SynthgenError(f"steps and prior steps must be >= 1 (got {job.steps}, {job.prior_steps})")
    check_pipeline_folder(base)
    index = json.loads((base / "model_index.json").read_text())
    model_mpp = index.get("mpp")
    if model_mpp is None:
        raise SynthgenError(f"{base}: the pipeline does not record its scale (mpp); assemble it with --mpp")
    tcfg = json.loads((base / "transformer" / "config.json").read_text())
    vae_cfg = json.loads((base / "vae" / "config.json").read_text())
    side = tcfg["sample_size"] * 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1)
    if not (base / "image_encoder").is_dir() and tcfg.get("use_embeddings", True):
        raise SynthgenError(f"{base}: no image_encoder/; adapt needs it to embed the dataset")
    work.mkdir(parents=True, exist_ok=True)

    classes, counts = _prepare_tiles(Path(job.dataset), work / "tiles", side, job.image_mpp, model_mpp, progress)
    _cache(job, base, work, side, progress)
    init = work / "denoiser_init"
    if not (init / "config.json").is_file():
        from synthgen.models.denoiser import Denoiser

        with atomic_dir(init) as tmp:
            Denoiser.with_classes(Denoiser.from_pretrained(base / "transformer"), classes).save_pretrained(tmp)
    denoiser = _train_denoiser(job, base, work, init, progress)
    prior = _train_prior(job, base, work, progress)

    summary = {"base": str(base), "dataset": str(job.dataset), "classes": classes, "tiles_per_class": counts,
               "image_mpp": job.image_mpp, "mpp": model_mpp, "tile_size": side, "steps": job.steps,
               "prior_steps": job.prior_steps, "lr": job.lr, "batch_size": job.batch_size,
               "dihedral": job.dihedral, "seed": job.seed}
    with atomic_dir(out) as tmp:
        for item in base.iterdir():
            if item.name in _REPLACED or item.name.startswith("."):
                continue
            name = "README.base.md" if item.name == "README.md" else item.name  # the base's model card, kept
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / name)
        shutil.copytree(denoiser, tmp / "transformer")
        shutil.copytree(prior, tmp / "prior")
        shutil.copytree(work / "cache", tmp / "bank", ignore=shutil.ignore_patterns(".*"))
        for key in ("fast_transformer", "fast_scheduler"):
            index.pop(key, None)
        atomic_write_text(tmp / "model_index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
        atomic_write_text(tmp / "adapt.json", json.dumps(summary, indent=1) + "\n")
        atomic_write_text(tmp / "README.md", _card(summary, base))
    return summary


def _prepare_tiles(dataset: Path, dest: Path, side: int, image_mpp, model_mpp, progress: bool):
    """Cut the dataset's images into ``side`` px tiles at the model's scale under ``dest/CLASS/``.
    Returns the class names (the dataset's, sorted for a folder) and the tiles per class."""
    from PIL import Image

    from synthgen._io import atomic_dir
    from synthgen.data.datasets import ImageListDataset, resize_image

    try:
        ds = ImageListDataset.from_folder(dataset) if dataset.is_dir() else ImageListDataset.from_csv(dataset)
    except SynthgenError as e:
        raise SynthgenError(f"dataset {dataset}: {e}") from None
    if ds.labels is None or ds.classes is None:
        raise SynthgenError(f"dataset {dataset}: needs classes (one sub-folder of images per class, or a CSV with "
                            "path,label and class names as labels)")
    counts = {c: ds.labels.count(i) for i, c in enumerate(ds.classes)}
    empty = [c for c, k in counts.items() if k == 0]
    if empty:
        raise SynthgenError(f"dataset {dataset}: class {', '.join(empty)} has no images")
    if len(ds.classes) < 2:
        raise SynthgenError(f"dataset {dataset}: one class ({ds.classes[0]}); adapt fine-tunes on all of a dataset's "
                            "classes so that they share the generator's look: give every class")
    if (dest / ".done.json").is_file():
        done = json.loads((dest / ".done.json").read_text())
        if done["classes"] == ds.classes and done["images"] == len(ds) and done["image_mpp"] == image_mpp:
            return ds.classes, done["tiles_per_class"]
    for stale in ("cache", "denoiser_init", "denoiser", "prior"):  # built from other tiles
        shutil.rmtree(dest.parent / stale, ignore_errors=True)
    factor = None if image_mpp is None else image_mpp / model_mpp
    tiles = {c: 0 for c in ds.classes}
    with atomic_dir(dest) as tmp:
        from tqdm.auto import tqdm

        for path, label in tqdm(list(zip(ds.paths, ds.labels, strict=True)), desc="tiling", unit="img",
                                disable=not progress):
            try:
                with Image.open(path) as im:
                    img = im.convert("RGB")
            except Exception as e:
                raise SynthgenError(f"{path}: cannot read image ({e})") from None
            if factor is None:
                if img.size != (side, side):
                    raise SynthgenError(
                        f"{path}: {img.width}x{img.height} px, but the model works on {side} px tiles at {model_mpp:g} "
                        "um/px; pass --image-mpp (the images' resolution, e.g. 0.25 for 40x, 0.5 for 20x) to "
                        "resample and cut them")
            else:
                img = resize_image(img, (max(1, round(img.width * factor)), max(1, round(img.height * factor))))
                if min(img.size) < side:
                    raise SynthgenError(f"{path}: {img.width}x{img.height} px at the model's {model_mpp:g} um/px "
                                        f"(from {image_mpp:g}), smaller than its {side} px tiles")
            name = ds.classes[label]
            (tmp / name).mkdir(exist_ok=True)
            nx, ny = img.width // side, img.height // side
            x0, y0 = (img.width - nx * side) // 2, (img.height - ny * side) // 2  # the grid, centred
            for j in range(ny):
                for i in range(nx):
                    box = (x0 + i * side, y0 + j * side, x0 + (i + 1) * side, y0 + (j + 1) * side)
                    img.crop(box).save(tmp / name / f"{tiles[name]:06d}.png")
                    tiles[name] += 1
        (tmp / ".done.json").write_text(json.dumps({"classes": ds.classes, "images": len(ds),
                                                    "image_mpp": image_mpp, "tiles_per_class": tiles}))
    return ds.classes, tiles


def _cache(job: AdaptJob, base: Path, work: Path, side: int, progress: bool) -> None:
    from synthgen.workflows.cache import CacheJob, cache

    encoders = {"latents": f"vae:{base / 'vae'}", "emb": f"ssl:{base / 'image_encoder'}"}
    cache(CacheJob(source=work / "tiles", out=work / "cache", encoders=encoders,
                   crop=side if job.dihedral else None, dihedral=job.dihedral, num_workers=0), progress=progress)


def _prediction(base: Path) -> str:
    sched = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    if "FlowMatch" in sched.get("_class_name", ""):
        return "flow"
    return sched.get("prediction_type", "epsilon")


def _run(cfg_dict: dict, progress: bool) -> Path:
    """Train (or resume, or skip when finished) one model; returns its ``model/`` folder."""
    from synthgen._io import atomic_write_text
    from synthgen.config import load_train_config
    from synthgen.training.trainer import train

    out = Path(cfg_dict["output_dir"])
    model = out / "model"
    done = out / ".adapt_done.json"
    if model.is_dir() and done.is_file() and json.loads(done.read_text()) == cfg_dict:
        return model
    cfg = load_train_config(None, cfg_dict)
    train(cfg, resume="latest" if (out / "checkpoints").is_dir() else None, progress=progress)
    atomic_write_text(done, json.dumps(cfg_dict))
    return model


def _train_denoiser(job: AdaptJob, base: Path, work: Path, init: Path, progress: bool) -> Path:
    cfg = {"task": "denoiser", "output_dir": str(work / "denoiser"), "steps": job.steps, "seed": job.seed,
           "model": {"pretrained": str(init)},
           "data": {"cache": str(work / "cache"), "vae": str(base / "vae"), "use_labels": True, "num_workers": 0},
           "objective": {"kind": _prediction(base), "cfg_dropout": 0.1, "cfg_dropout_labels": 0.1},
           "optim": {"lr": job.lr, "batch_size": job.batch_size, "warmup_steps": min(50, job.steps // 10),
                     "grad_clip": 1.0},
           "mixed_precision": "no", "ema_decay": 0.0, "checkpoint_every": max(25, job.steps // 6),
           "keep_checkpoints": 1, "log_every": max(1, min(50, job.steps // 10)), "sample_every": 0}
    return _run(cfg, progress)


def _train_prior(job: AdaptJob, base: Path, work: Path, progress: bool) -> Path:
    from synthgen.data.cache import CacheDataset

    n = len(CacheDataset(work / "cache"))
    over = {}
    if (base / "prior" / "config.json").is_file():
        pc = json.loads((base / "prior" / "config.json").read_text())
        over = {k: pc[k] for k in ("width", "depth") if k in pc}
    cfg = {"task": "prior", "output_dir": str(work / "prior"), "steps": job.prior_steps, "seed": job.seed,
           "model": {"overrides": over}, "data": {"cache": str(work / "cache"), "num_workers": 0},
           "objective": {"cfg_dropout": 0.1},
           "optim": {"lr": 1e-3, "batch_size": min(128, n), "warmup_steps": min(100, job.prior_steps // 10),
                     "weight_decay": 1e-4},
           "ema_decay": 0.99, "checkpoint_every": max(100, job.prior_steps // 4), "keep_checkpoints": 1,
           "log_every": max(1, min(100, job.prior_steps // 10))}
    return _run(cfg, progress)


def _card(summary: dict, base: Path) -> str:
    counts = ", ".join(f"{c} {k}" for c, k in summary["tiles_per_class"].items())
    return f"""# Adapted synthgen pipeline

Fine-tuned by `synthgen adapt` from `{base}` on `{summary['dataset']}`: classes {counts} (tiles of
{summary['tile_size']} px at {summary['mpp']:g} um/px{', in 8 dihedral views' if summary['dihedral'] else ''}).
The denoiser was fully fine-tuned for {summary['steps']} steps (lr {summary['lr']:g}, batch
{summary['batch_size']}) with these classes as its class vocabulary; `bank/` holds the dataset's embeddings
and `prior/` an embedding prior trained on them ({summary['prior_steps']} steps). The base's few-step
variant was dropped (it was distilled from the base denoiser). All settings: `adapt.json`.

Generate a class: `synthgen generate PIPELINE --class NAME -n N -o OUT` (real embeddings of that
class from the bank), or `--mode prior` (embeddings sampled by the prior).

**Licence.** The base pipeline's terms (its `LICENSE` and model card `README.base.md`, copied here) apply, and so do
the terms of the dataset it was adapted on (the base's data are listed in `README.base.md`): the weights were trained on it, and `bank/` holds
embeddings of its images. Check both before sharing this folder.
"""
