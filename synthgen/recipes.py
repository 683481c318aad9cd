"""YAML recipes: a whole study (tile -> cache -> train -> generate -> rare -> export -> evaluate) as
one validated file, run with ``synthgen run recipe.yaml``. ``rare`` generates images of one class
from the pipeline's own labelled bank and embedding prior (``PIPELINE/bank``, ``PIPELINE/prior``).

Each step writes into ``output_dir/<step>/``. A step is skipped when its configuration and the
steps it reads from are unchanged since it last completed (content hashes in
``output_dir/.steps.json``); a changed step is redone from scratch, and so is everything after
it. An interrupted step resumes with its own mechanism (cache shards, generation records,
training checkpoints); exports are atomic.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from synthgen import __version__
from synthgen._io import atomic_write_text
from synthgen.config import SAMPLING, ConfigError, load_yaml, merge, to_dict

STEPS = ("tile", "cache", "train", "generate", "rare", "paired", "stain", "export", "evaluate")


@dataclass(frozen=True)
class TileStep:
    slides: tuple[str, ...]
    mpp: float = 1.0
    size: int = 64
    overlap: int = 0
    min_tissue: float = 0.5
    slide_mpp: float | None = None
    roi: tuple[float, ...] | None = None


@dataclass(frozen=True)
class CacheStep:
    encoders: dict  # name -> encoder spec (see `synthgen cache --help`)
    batch_size: int = 32
    shard_size: int = 1024


@dataclass(frozen=True)
class TrainStep:
    config: str  # a `synthgen train` YAML; data.cache points at this recipe's cache when there is one
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GenerateStep:
    pipeline: str
    n: int
    mode: Literal["variations", "prior", "interpolation", "class"] = "variations"
    label: int | str | None = None  # a class id, or a class name of the prior/bank
    prior: str | None = None
    filter: bool = False
    guidance: float = SAMPLING.guidance
    steps: int = SAMPLING.steps
    seed: int = 0
    batch_size: int = 16


@dataclass(frozen=True)
class PairedStep:
    """Mask-guided image/mask pairs (segmentation training data) into ``paired/``."""

    pipeline: str  # a pipeline with a mask branch (controlnet/), or give controlnet
    n: int
    masks: str = "nuclei"  # nuclei: pseudo-labels of this recipe's tiles; procedural; or a folder of label maps
    augment: bool = False  # flip/rotate/elastic/remove/add the masks before use
    density: float = 0.2  # procedural masks: covered fraction
    diameter_um: float = 7.0  # nucleus size for pseudo-labels, procedural and added nuclei
    controlnet: str | None = None  # a mask branch replacing the pipeline's own
    guidance: float = SAMPLING.guidance
    steps: int = SAMPLING.steps
    seed: int = 0
    batch_size: int = 16


@dataclass(frozen=True)
class StainStep:
    """Virtual IHC of source tiles into ``stain/`` (and scores against real IHC tiles, if given)."""

    to: str  # target stain (ki67, ...): the pipeline needs stains/<to>/
    pipeline: str = "checkpoints/synthgen-small-cmu"
    source: str | None = None  # a folder of tiles; default: the tile step's tiles
    real: str | None = None  # real target-stain tiles with the source's file names: scored (stain.json)
    n: int = 32  # tiles taken from the tile step
    structure: bool = False  # embedding route: keep the source's nuclei in place (mask branch)
    route: Literal["spatial", "embedding"] | None = None  # default: embedding where the stain has it
    image_guidance: float | None = None  # spatial route: guidance on the source image (None: none)
    guidance: float = SAMPLING.guidance
    steps: int = SAMPLING.steps
    seed: int = 0


@dataclass(frozen=True)
class ExportStep:
    source: Literal["generate", "rare", "paired"] = "generate"  # which step's images to export
    format: Literal["imagefolder", "webdataset", "hf"] = "imagefolder"
    class_names: tuple[str, ...] | None = None
    audit_encoder: str | None = None  # set to gate the export on the memorisation audit
    audit_threshold: float = 0.5
    max_flagged: float = 0.01
    drop_flagged: bool = False
    allow_risk: bool = False
    licence: str = "CC-BY-4.0"


@dataclass(frozen=True)
class EvaluateStep:
    encoder: str
    bootstrap: int = 100


@dataclass(frozen=True)
class Recipe:
    name: str
    output_dir: str
    tile: TileStep | None = None
    cache: CacheStep | None = None
    train: TrainStep | None = None
    generate: GenerateStep | None = None
    rare: GenerateStep | None = None  # one class (label) from the pipeline's bank/prior, into rare/
    paired: PairedStep | None = None
    stain: StainStep | None = None
    export: ExportStep | None = None
    evaluate: EvaluateStep | None = None

    def __post_init__(self):
        for name in STEPS:
            if getattr(self, name) is not None:
                _check_ranges(name, getattr(self, name))
        if not any(getattr(self, s) for s in STEPS):
            raise ConfigError(f"recipe {self.name!r}: no steps (give at least one of: {', '.join(STEPS)})")
        if self.cache and not self.tile:
            raise ConfigError("cache: needs a tile step (it encodes the tiles)")
        if self.export and not getattr(self, self.export.source):
            raise ConfigError(f"export.source: needs a {self.export.source} step (it exports its images)")
        if self.export and self.export.audit_encoder and not self.tile:
            raise ConfigError("export.audit_encoder: the audit compares against the tiles of a tile step")
        if self.evaluate and not ((self.generate or self.paired) and self.tile):
            raise ConfigError("evaluate: needs a tile step and a generate or paired step (real vs synthetic)")
        if self.paired and self.paired.masks == "nuclei" and not self.tile:
            raise ConfigError("paired.masks: 'nuclei' pseudo-labels the tiles of a tile step (or give a folder)")
        if self.stain and not (self.stain.source or self.tile):
            raise ConfigError("stain.source: give a folder of tiles, or add a tile step")
        if self.rare and self.rare.label is None:
            raise ConfigError("rare.label: required (a class id or name of the pipeline's bank/prior)")
        if self.generate and self.generate.mode in ("variations", "interpolation") and not self.cache:
            raise ConfigError(f"generate.mode: {self.generate.mode!r} draws real embeddings from a cache step")


def _positive(v) -> bool:
    return v > 0 and v == v and v != float("inf")  # not NaN, not inf


_FRACTION = (lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
_COUNT = (lambda v: v >= 1, "an integer >= 1")
_POSITIVE = (_positive, "a positive number")
# the range of each numeric field of each step (types and choices are checked by from_dict)
_RANGES = {
    TileStep: {"mpp": (_positive, "a positive number of microns per pixel"), "size": _COUNT,
               "overlap": (lambda v: v >= 0, "an integer >= 0"), "min_tissue": _FRACTION, "slide_mpp": _POSITIVE},
    CacheStep: {"batch_size": _COUNT, "shard_size": _COUNT},
    GenerateStep: {"n": _COUNT, "steps": _COUNT, "batch_size": _COUNT},
    PairedStep: {"n": _COUNT, "steps": _COUNT, "batch_size": _COUNT, "diameter_um": _POSITIVE,
                 "density": (lambda v: 0 < v <= 1, "a fraction in (0, 1]")},
    StainStep: {"n": _COUNT, "steps": _COUNT},
    ExportStep: {"audit_threshold": _POSITIVE, "max_flagged": _FRACTION},
    EvaluateStep: {"bootstrap": (lambda v: v >= 0, "an integer >= 0")},
}


def _check_ranges(name: str, step) -> None:
    """Range checks of one step, at load (so ``--dry-run`` catches them); messages name ``step.field``."""
    for fld, (ok, what) in _RANGES.get(type(step), {}).items():
        v = getattr(step, fld)
        if v is not None and not ok(v):
            raise ConfigError(f"{name}.{fld}: must be {what}, got {v}")
    if isinstance(step, TileStep):
        if step.overlap >= step.size:
            raise ConfigError(f"{name}.overlap: must be smaller than {name}.size ({step.size}), got {step.overlap}")
        r = step.roi
        if r is not None and not (len(r) == 4 and 0 <= r[0] < r[2] <= 1 and 0 <= r[1] < r[3] <= 1):
            raise ConfigError(f"{name}.roi: must be [x0, y0, x1, y1] fractions with 0 <= x0 < x1 <= 1 and "
                              f"0 <= y0 < y1 <= 1, got {list(r)}")
        if not step.slides:
            raise ConfigError(f"{name}.slides: give at least one slide file or folder")
    if isinstance(step, CacheStep) and not step.encoders:
        raise ConfigError(f"{name}.encoders: give at least one NAME: SPEC")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe; errors name the field and the allowed values."""
    return load_yaml(Recipe, path, overrides, "recipe")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan(recipe: Recipe) -> list[tuple[str, str, str]]:
    """(step, hash, 'run' | 'skip') in order; a step's hash covers its config and its inputs'."""
    out_dir = Path(recipe.output_dir)
    state = _state(out_dir)
    rows, upstream, dirty = [], "", False
    for name in STEPS:
        step = getattr(recipe, name)
        if step is None:
            continue
        h = _hash([name, to_dict(step), upstream, _file_hashes(name, step), __version__])
        done = state.get(name) == h and (out_dir / name).exists()
        dirty = dirty or not done
        rows.append((name, h, "run" if dirty else "skip"))
        upstream = h
    return rows


def _file_hashes(name: str, step) -> dict:
    """Content of the files a step reads, so that editing them reruns the step."""
    files = []
    if name == "tile":
        files = list(step.slides)
    elif name == "train":
        files = [step.config]
    out = {}
    for f in files:
        p = Path(f)
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                h.update(fh.read(1 << 20))
            out[f] = f"{p.stat().st_size}:{h.hexdigest()[:16]}"
    return out


def _state(out_dir: Path) -> dict:
    f = out_dir / ".steps.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _mark(out_dir: Path, name: str, h: str) -> None:
    state = _state(out_dir)
    state[name] = h
    atomic_write_text(out_dir / ".steps.json", json.dumps(state, indent=1))


def run(recipe: Recipe, dry_run: bool = False, echo=print) -> list[tuple[str, str, str]]:
    """Run the steps that changed; returns the plan that was followed."""
    rows = plan(recipe)
    out = Path(recipe.output_dir)
    if dry_run:
        return rows
    out.mkdir(parents=True, exist_ok=True)
    state = _state(out)
    for name, h, action in rows:
        if action == "skip":
            echo(f"[{name}] unchanged, skipped")
            continue
        if state.get(name) not in (None, h) and (out / name).exists():
            shutil.rmtree(out / name)  # its configuration or inputs changed: redo from scratch
        echo(f"[{name}] running")
        getattr(_Steps(recipe, out), name)()
        _mark(out, name, h)
    return rows


class _Steps:
    def __init__(self, recipe: Recipe, out: Path):
        self.r, self.out = recipe, out

    def tile(self):
        from synthgen.workflows.tile import TileJob, tile

        s = self.r.tile
        tile(TileJob(inputs=list(s.slides), out=self.out / "tile" / "tiles.csv", mpp=s.mpp, size=s.size,
                     overlap=s.overlap, min_tissue=s.min_tissue, slide_mpp=s.slide_mpp,
                     roi=tuple(s.roi) if s.roi else None))

    def cache(self):
        from synthgen.workflows.cache import CacheJob, cache

        s = self.r.cache
        cache(CacheJob(source=self.out / "tile" / "tiles.csv", out=self.out / "cache", encoders=dict(s.encoders),
                       batch_size=s.batch_size, shard_size=s.shard_size, num_workers=0))

    def train(self):
        from synthgen.config import load_train_config
        from synthgen.training.trainer import train

        s = self.r.train
        extra = {"output_dir": str(self.out / "train")}
        if self.r.cache:
            extra["data"] = {"cache": str(self.out / "cache")}
        cfg = load_train_config(s.config, merge(s.overrides, extra))
        resume = "latest" if (self.out / "train" / "checkpoints").exists() else None
        result = train(cfg, resume=resume)
        if result.interrupted:
            raise ConfigError(f"train: interrupted at step {result.step}; rerun the recipe to resume")

    def generate(self):
        from synthgen.workflows.generate import GenerateJob, generate

        s = self.r.generate
        generate(GenerateJob(pipeline=Path(s.pipeline), out=self.out / "generate", n=s.n, mode=s.mode,
                             cache_dir=(self.out / "cache") if self.r.cache else None, label=s.label,
                             prior_dir=Path(s.prior) if s.prior else None, use_filter=s.filter, guidance=s.guidance,
                             steps=s.steps, seed=s.seed, batch_size=s.batch_size))

    def rare(self):
        from synthgen.workflows.generate import GenerateJob, generate

        s = self.r.rare
        generate(GenerateJob(pipeline=Path(s.pipeline), out=self.out / "rare", n=s.n, mode=s.mode, label=s.label,
                             prior_dir=Path(s.prior) if s.prior else None, use_filter=s.filter, guidance=s.guidance,
                             steps=s.steps, seed=s.seed, batch_size=s.batch_size))

    def paired(self):
        from synthgen.workflows.generate import GenerateJob, generate

        s = self.r.paired
        generate(GenerateJob(pipeline=Path(s.pipeline), out=self.out / "paired", n=s.n, mode="mask",
                             guidance=s.guidance, steps=s.steps, seed=s.seed, batch_size=s.batch_size,
                             masks_dir=self._condition_masks(s), controlnet=Path(s.controlnet) if s.controlnet else None))

    def _condition_masks(self, s: PairedStep) -> Path:
        """The folder of condition label maps: pseudo-labels, procedural or the user's (then augmented)."""
        from synthgen.workflows.masks import ConditionMasksJob, condition_masks

        t = self.r.tile
        return condition_masks(ConditionMasksJob(
            out=self.out / "paired_masks", masks=s.masks, n=s.n, tiles=self.out / "tile" / "tiles.csv",
            mpp=t.mpp if t else 1.0, size=t.size if t else 64, diameter_um=s.diameter_um, density=s.density,
            augment=s.augment, seed=s.seed))

    def stain(self):
        import numpy as np
        from PIL import Image

        from synthgen.pipelines.stain import is_spatial
        from synthgen.workflows.stain import (
            StainJob,
            load,
            read_tile_folder,
            stain_tiles,
            to_model_scale,
        )

        s = self.r.stain
        if s.structure and s.route == "spatial":
            raise ConfigError("stain.structure: the mask branch is for route: embedding; the spatial route keeps "
                              "the source's layout by itself (drop structure)")
        job = StainJob(to=s.to, out=self.out / "stain", pipeline=Path(s.pipeline), route=s.route, structure=s.structure,
                       image_guidance=s.image_guidance, steps=s.steps, guidance=s.guidance, seed=s.seed)
        pipe, translator = load(job)
        if s.source:
            tiles, names = read_tile_folder(Path(s.source))
        else:
            from synthgen.data.datasets import PatchDataset

            ds = PatchDataset(self.out / "tile" / "tiles.csv")
            idx = np.random.default_rng(s.seed).permutation(len(ds))[: s.n]
            names = [f"{int(i):06d}.png" for i in idx]
            tiles = np.stack([ds[int(i)]["image"].permute(1, 2, 0).numpy() for i in idx])
            tiles = to_model_scale(pipe, tiles, self.r.tile.mpp)  # the stain model may work at another scale
        images = stain_tiles(job, tiles, (pipe, translator))
        out = self.out / "stain"
        for name, src, im in zip(names, tiles, images, strict=True):
            for sub, arr in (("virtual", im), ("source", src)):
                (out / sub / name).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(out / sub / name)
        import torch

        from synthgen.metrics.stain import structure_score
        from synthgen.training.tasks import save_grid

        k = min(len(tiles), 8)  # sources above, their virtual IHC below, in pairs of rows
        rows = [r for lo in range(0, len(tiles), k) for r in (tiles[lo : lo + k], images[lo : lo + k]) if len(r) == k]
        save_grid(torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2), out / "contact_sheet.png", nrow=k)
        atomic_write_text(out / "structure.json", json.dumps(
            {"route": "spatial" if is_spatial(pipe) else "embedding", **structure_score(tiles, images)}, indent=1))
        if s.real:
            from synthgen.metrics.stain import stain_report

            real = np.stack([np.asarray(Image.open(Path(s.real) / n).convert("RGB")) for n in names])
            atomic_write_text(out / "stain.json", json.dumps(stain_report(real, images, source=tiles), indent=1))

    def export(self):
        from synthgen.export.writers import export_dataset
        from synthgen.workflows.audit import audit as run_audit

        s = self.r.export
        audit = None
        if s.audit_encoder:
            audit = run_audit(self.out / s.source, self.out / "tile" / "tiles.csv", s.audit_encoder, s.audit_threshold)
        manifest = json.loads((self.out / s.source / "manifest.json").read_text())
        manifest["recipe_sha256"] = _hash(to_dict(self.r))
        (self.out / s.source / "manifest.json").write_text(json.dumps(manifest, indent=1))
        export_dataset(self.out / s.source, self.out / "export", s.format,
                       class_names=list(s.class_names) if s.class_names else None, licence=s.licence, audit=audit,
                       max_flagged=s.max_flagged, allow_risk=s.allow_risk, drop_flagged=s.drop_flagged)

    def evaluate(self):
        from synthgen.encoders.load import load_encoder
        from synthgen.metrics.fidelity import extract_features, fidelity_report
        from synthgen.workflows.datasets import image_set

        enc = load_encoder(self.r.evaluate.encoder)
        fr, _ = extract_features(enc, image_set(self.out / "tile" / "tiles.csv", None))
        synth = self.out / ("generate" if self.r.generate else "paired")
        fs, _ = extract_features(enc, image_set(synth, None))
        report = fidelity_report(fr, fs, n_bootstrap=self.r.evaluate.bootstrap)
        ev = self.out / "evaluate"
        ev.mkdir(parents=True, exist_ok=True)
        (ev / "fidelity.json").write_text(json.dumps(report, indent=1))
        if self.r.paired:
            (ev / "masks.json").write_text(json.dumps(self._adherence(), indent=1))
        contact_sheet(self.out / "tile" / "tiles.csv", synth, ev / "contact_sheet.png")
        (ev / "summary.md").write_text(_summary(self.r, self.out, report))


    def _adherence(self) -> dict:
        """Adherence of the paired output to its masks, and the mask branch beside its baseline."""
        import numpy as np
        from PIL import Image

        from synthgen.data.masks import read_label_map
        from synthgen.metrics.masks import adherence_study, mask_adherence
        from synthgen.pipelines.generate import SynthPipeline

        s, root = self.r.paired, self.out / "paired"
        items = json.loads((root / "manifest.json").read_text())["items"]
        images = [np.asarray(Image.open(root / it["file"]).convert("RGB")) for it in items]
        masks = np.stack([read_label_map(root / it["mask"]) for it in items])
        out = {"paired_output": mask_adherence(images, masks)}
        out["paired_output"].pop("dice_per_image")
        pipe = SynthPipeline.from_pretrained(s.pipeline)
        if s.controlnet:
            from synthgen.models.controlnet import MaskControlNet

            pipe.register_modules(controlnet=MaskControlNet.from_pretrained(s.controlnet))
        pipe.set_progress_bar_config(disable=True)
        study = adherence_study(pipe, masks[:16], None, num_inference_steps=s.steps)
        study.pop("images")
        out["with_and_without_branch"] = study
        return out


def contact_sheet(tiles: Path, generated: Path, path: Path, n: int = 8) -> Path:
    """PNG: a row of real tiles above rows of synthetic images (up to 3 x ``n``)."""
    import torch

    from synthgen.training.tasks import save_grid
    from synthgen.workflows.datasets import image_set

    real, synth = image_set(tiles, None), image_set(generated, None)
    g = torch.Generator().manual_seed(0)
    ridx = torch.randperm(len(real), generator=g)[:n].tolist()
    rows = [real[i]["image"] for i in ridx] + [synth[i]["image"] for i in range(min(len(synth), 2 * n))]
    side = rows[0].shape[-1]
    rows = [r if r.shape[-1] == side else torch.nn.functional.interpolate(r[None].float(), size=(side, side))[0]
            .to(torch.uint8) for r in rows]
    save_grid(torch.stack(rows), path, nrow=n)
    return path


def _summary(recipe: Recipe, out: Path, report: dict) -> str:
    o = report["overall"]
    lines = [f"# {recipe.name}", "", f"- real tiles: {o['n_real']}; synthetic images: {o['n_fake']}",
             f"- FD {o['fd']['value']:.3f} (95% CI {o['fd']['ci95'][0]:.3f}-{o['fd']['ci95'][1]:.3f}), "
             f"KID {o['kid']['value']:.4f}"]
    if "precision" in o:
        lines.append("- precision {:.2f}, recall {:.2f}, density {:.2f}, coverage {:.2f}".format(
            *(o[m]["value"] for m in ("precision", "recall", "density", "coverage"))))
    exp = out / "export" / "manifest.json"
    if exp.exists():
        m = json.loads(exp.read_text())
        audit = m.get("privacy_audit") or {}
        lines.append(f"- export: {m['num_items']} items ({m['format']}) in {out / 'export'}; "
                     f"audit: {audit.get('n_flagged', 'not run')} flagged of {audit.get('n_checked', '-')}")
    rare = out / "rare" / "manifest.json"
    if rare.exists():
        m = json.loads(rare.read_text())
        rate = f"; class filter acceptance {m['acceptance_rate']:.2f}" if "acceptance_rate" in m else ""
        lines.append(f"- rare class {m.get('class_name', m['class'])} ({m['mode']}): {m['num_items']} images in "
                     f"{out / 'rare'}{rate}")
    if recipe.stain and (out / "stain" / "virtual").is_dir():
        n = len(list((out / "stain" / "virtual").rglob("*.png")))
        line = f"- virtual {recipe.stain.to}: {n} tiles in {out / 'stain' / 'virtual'} (sources beside them)"
        if (out / "stain" / "structure.json").exists():
            st = json.loads((out / "stain" / "structure.json").read_text())
            line += (f"; {st['route']} route, structure score (nuclei Dice vs the source) {st['dice']:.2f} "
                     "(source | virtual rows: stain/contact_sheet.png)")
        if (out / "stain" / "stain.json").exists():
            m = json.loads((out / "stain" / "stain.json").read_text())
            line += (f"; DAB fraction Pearson {m['dab'].get('pearson', float('nan')):.2f} vs real, "
                     f"SSIM {m['ssim']:.3f}")
        lines.append(line)
    masks = out / "evaluate" / "masks.json"
    if masks.exists():
        m = json.loads(masks.read_text())
        w = m["with_and_without_branch"]
        lines.append(f"- mask-guided pairs: {m['paired_output']['num_images']} in {out / 'paired'}; adherence Dice "
                     f"{m['paired_output']['dice']:.2f}, object F1 {m['paired_output']['object_f1']:.2f} (same masks "
                     f"without the mask branch: Dice {w['baseline']['dice']:.2f}, F1 {w['baseline']['object_f1']:.2f})")
    lines.append(f"- contact sheet: {out / 'evaluate' / 'contact_sheet.png'} (top row real, then synthetic)")
    return "\n".join(lines) + "\n"
