"""Dataset-scale generation: a job of N items split across processes, resumable, merged into
one manifest.

The plan (condition, label and seed of every item) is a pure function of the options, so each
process computes the same plan and takes items ``i % world == rank``. Each image is written
atomically as ``images/{i:07d}.png`` with a line in ``records/rank-R.jsonl``; a rerun skips
items that have both. When every process is done, rank 0 merges the records into
``manifest.json``. A 2-process run therefore writes exactly the files of a 1-process run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from synthgen._io import atomic_path, atomic_write_text, sha256_file
from synthgen.config import SAMPLING


@dataclass
class GenerationPlan:
    """Every item of a job: condition embeddings (or None), class labels, seeds, kind, and
    optionally one condition mask file per item (mask-guided pipelines)."""

    embeddings: torch.Tensor | None  # (N, tokens, dim)
    labels: list[int | None]
    seeds: list[int]
    kind: str  # what the conditions are: variations / prior / interpolation / class / embedding / mask
    masks: list[Path] | None = None
    # variations of reference images: the images (uint8 (R, 3, H, W)) and each item's index into
    # them, so that anchored variations (strength < 1) can start from the reference's latent
    references: torch.Tensor | None = None
    reference_index: list[int] | None = None

    def __len__(self) -> int:
        return len(self.seeds)


def _done(out: Path) -> dict[int, dict]:
    recs = {}
    for f in sorted((out / "records").glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: that item is redone
            if (out / r["file"]).exists() and ("mask" not in r or (out / r["mask"]).exists()):
                recs[r["index"]] = r
    return recs


def run_plan(pipe, plan: GenerationPlan, out: str | os.PathLike, *, rank: int = 0, world: int = 1,
             guidance_scale: float = SAMPLING.guidance, num_inference_steps: int = SAMPLING.steps, batch_size: int = 16,
             class_filter=None, encoder=None, progress: bool = True, strength: float = 1.0,
             fast: bool | None = None) -> int:
    """Generate this process's share of ``plan`` into ``out``; returns the number of new images.

    Args:
        pipe: a :class:`~synthgen.pipelines.generate.SynthPipeline`.
        strength: below 1, anchored variations (SDEdit) of the plan's reference images.
        fast: the pipeline's few-step variant (see ``SynthPipeline.__call__``).
        class_filter, encoder: when given, each image is re-encoded and ``accepted`` records
            whether it is nearest to its own class (see :class:`~synthgen.pipelines.rare.ClassFilter`).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from synthgen.data.masks import read_label_map, write_label_map

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if plan.masks is not None:
        (out / "masks").mkdir(exist_ok=True)
    (out / "records").mkdir(parents=True, exist_ok=True)
    done = _done(out)
    mine = [i for i in range(len(plan)) if i % world == rank and i not in done]
    written = 0
    records = out / "records" / f"rank-{rank}.jsonl"
    bar = tqdm(total=len(mine), desc=f"generate (rank {rank})", unit="img", disable=not progress)
    for lo in range(0, len(mine), batch_size):
        idx = mine[lo : lo + batch_size]
        kw = {}
        if strength < 1:  # the pipeline re-encodes the references (the same embeddings) and starts from their latents
            kw["images"], kw["strength"] = plan.references[[plan.reference_index[i] for i in idx]], strength
        elif plan.embeddings is not None:
            kw["embeddings"] = plan.embeddings[idx]
        if pipe.transformer.config.num_classes:
            kw["class_labels"] = torch.tensor([plan.labels[i] if plan.labels[i] is not None else -1 for i in idx])
        masks = None
        if plan.masks is not None:
            masks = [read_label_map(plan.masks[i], size=(pipe.image_size, pipe.image_size)) for i in idx]
            kw["masks"] = np.stack(masks)
        res = pipe(**kw, seeds=[plan.seeds[i] for i in idx], guidance_scale=guidance_scale,
                   num_inference_steps=num_inference_steps, batch_size=batch_size, output_type="pt", fast=fast)
        accepted = [None] * len(idx)
        if class_filter is not None and encoder is not None:
            with torch.no_grad():
                emb = encoder(res.images)
            accepted = class_filter.accept(emb.cpu(), [plan.labels[i] for i in idx]).tolist()
        with open(records, "a") as f:
            for k, i in enumerate(idx):
                rel = f"images/{i:07d}.png"
                with atomic_path(out / rel, suffix=".png") as tmp:  # removed if the write fails
                    Image.fromarray(res.images[k].permute(1, 2, 0).numpy()).save(tmp)
                rec = {"index": i, "file": rel, "seed": plan.seeds[i], "label": plan.labels[i],
                       "condition": plan.kind, "accepted": accepted[k]}
                if plan.reference_index is not None:
                    rec["reference"] = plan.reference_index[i]
                if masks is not None:  # the condition mask, paired with its image (a segmentation pair)
                    rec["mask"] = f"masks/{i:07d}.png"
                    write_label_map(out / rec["mask"], masks[k])
                    rec["mask_source"] = plan.masks[i].name
                f.write(json.dumps(rec) + "\n")
                f.flush()
                written += 1
        bar.update(len(idx))
    bar.close()
    return written


def merge_manifest(out: str | os.PathLike, plan_size: int, meta: dict) -> Path:
    """Merge every process's records into ``manifest.json`` (sorted, with sha256 per image).

    Raises:
        RuntimeError: items are missing (a process has not finished): rerun to complete them.
    """
    out = Path(out)
    recs = _done(out)
    missing = sorted(set(range(plan_size)) - set(recs))
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} of {plan_size} items not generated yet (e.g. {missing[:5]}); "
                           "rerun the same command to finish")
    items = [dict(recs[i], sha256=sha256_file(out / recs[i]["file"])) for i in range(plan_size)]
    for it in items:
        if "mask" in it:
            it["mask_sha256"] = sha256_file(out / it["mask"])
    accepted = [r["accepted"] for r in items if r["accepted"] is not None]
    manifest = {**meta, "num_items": plan_size, "items": items}
    if accepted:
        manifest["acceptance_rate"] = sum(accepted) / len(accepted)
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return out / "manifest.json"
