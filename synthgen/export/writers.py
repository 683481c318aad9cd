"""Shareable exports of a generated dataset: ImageFolder (PNG), WebDataset tar shards, or a
HuggingFace ``datasets`` parquet folder, each with ``manifest.json`` and ``DATASHEET.md``.

De-identification by construction: every image is re-encoded from its pixels (no EXIF, PNG text
or TIFF tags survive), files are named by item index, and nothing from source slides (names,
keys, label/macro images) or the condition embeddings is written unless asked. The export is
built in a temporary folder renamed at the end, so an interrupted export leaves no half dataset;
``synthgen verify`` re-checks every checksum.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

from synthgen._io import OutputLock, atomic_dir
from synthgen.errors import SynthgenError

FORMATS = ("imagefolder", "webdataset", "hf")


def _png_bytes(path: Path) -> bytes:
    """Pixels only: decode and re-encode, dropping every metadata chunk of the source file."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_dataset(source: str | os.PathLike, out: str | os.PathLike, fmt: str = "imagefolder",
                   class_names: list[str] | None = None, drop_rejected: bool = False, shard_size: int = 1000,
                   licence: str = "CC-BY-4.0", purpose: str | None = None, audit: dict | None = None,
                   max_flagged: float = 0.01, allow_risk: bool = False, drop_flagged: bool = False,
                   force: bool = False) -> Path:
    """Export a ``synthgen generate`` output folder.

    Args:
        source: folder with ``manifest.json`` and ``images/``.
        out: export folder (must not exist).
        fmt: ``imagefolder``, ``webdataset`` or ``hf``.
        class_names: names for label ids (default: ``class_<id>``).
        drop_rejected: leave out items the class filter rejected.
        shard_size: items per WebDataset tar / parquet file.
        force: take over the lock (``.<out>.lock`` beside ``out``) of another export to ``out``.
        audit: a :func:`~synthgen.metrics.privacy.memorization_audit` report over the source's
            items (in manifest order). The export refuses when more than ``max_flagged`` of the
            exported items are flagged near-copies, unless ``allow_risk``; ``drop_flagged``
            removes them instead. The audit summary and per-item ratios go into the manifest.

    Raises:
        SynthgenError: unknown format, existing output, output inside the source (or the
            reverse), missing or tampered source items, the privacy gate, or another export to
            ``out`` running (:class:`~synthgen.errors.LockError`).
    """
    if fmt not in FORMATS:
        raise SynthgenError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    source, out = Path(source), Path(out)
    src_abs, out_abs = source.resolve(), out.resolve()
    if out_abs == src_abs or out_abs.is_relative_to(src_abs):
        raise SynthgenError(f"{out}: inside the export's source {source}; choose an output folder outside it")
    if src_abs.is_relative_to(out_abs):
        raise SynthgenError(f"{out}: contains the export's source {source}; choose an output folder outside it")
    if out.exists():
        raise SynthgenError(f"{out}: already exists; exports are written once (choose a new folder)")
    man_path = source / "manifest.json"
    if not man_path.exists():
        raise SynthgenError(f"{source}: no manifest.json (is this a finished `synthgen generate` output?)")
    src = json.loads(man_path.read_text())
    items = list(src["items"])
    if audit is not None:
        if len(audit["flagged"]) != len(items):
            raise SynthgenError(f"audit covers {len(audit['flagged'])} items but {source} has {len(items)}")
        items = [dict(it, nn_ratio=audit["ratio"][i], flagged=audit["flagged"][i]) for i, it in enumerate(items)]
    items = [it for it in items if not (drop_rejected and it.get("accepted") is False)]
    if audit is not None:
        n_flagged = sum(it["flagged"] for it in items)
        if drop_flagged:
            items = [it for it in items if not it["flagged"]]
        elif items and n_flagged / len(items) > max_flagged and not allow_risk:
            raise SynthgenError(
                f"export refused: {n_flagged} of {len(items)} items ({n_flagged / len(items):.1%}) are near-copies of "
                f"training items (limit {max_flagged:.1%}); use --drop-flagged to remove them or --allow-risk to "
                "export anyway")
        src = dict(src, privacy_audit={
            "threshold": audit["threshold"], "n_checked": len(audit["flagged"]), "n_flagged": n_flagged,
            "flagged_fraction": audit["flagged_fraction"], "dropped_flagged": drop_flagged,
            "allow_risk": allow_risk and not drop_flagged, "n_real_reference": audit["n_real"],
            "pixel_check": "pixel_ratio" in audit})
    if not items:
        raise SynthgenError(f"{source}: no items to export")

    def name_of(label) -> str:
        if label is None:
            return "unlabelled"
        if class_names is not None:
            if not 0 <= label < len(class_names):
                raise SynthgenError(f"label {label} has no name in class_names ({len(class_names)} given)")
            return class_names[label]
        return f"class_{label}"

    lock = OutputLock(out, "export", force=force, path=out.with_name(f".{out.name}.lock")).acquire()
    records = []
    masks: dict[int, bytes] = {}
    try:
        with atomic_dir(out) as tmp:
            data = []
            for k, it in enumerate(items):
                f = source / it["file"]
                if not f.exists():
                    raise SynthgenError(f"{f}: listed in the manifest but missing")
                raw = f.read_bytes()
                if it.get("sha256") and _sha(raw) != it["sha256"]:
                    raise SynthgenError(f"{f}: checksum differs from {man_path.name} (modified after generation)")
                data.append((k, it, _png_bytes(f)))
                if "mask" in it:  # a mask-guided pair: the condition mask travels with its image
                    m = source / it["mask"]
                    if not m.exists():
                        raise SynthgenError(f"{m}: mask listed in the manifest but missing")
                    if it.get("mask_sha256") and _sha(m.read_bytes()) != it["mask_sha256"]:
                        raise SynthgenError(f"{m}: checksum differs from {man_path.name} (modified after generation)")
                    masks[k] = m.read_bytes()
            if fmt == "imagefolder":
                for k, it, png in data:
                    rel = f"{name_of(it['label'])}/{k:07d}.png"
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / rel).write_bytes(png)
                    records.append(_record(k, it, rel, _sha(png)))
                    if k in masks:  # segmentation layout: masks/<class>/<k>.png beside images/<class>/<k>.png
                        mrel = f"masks/{rel}"
                        (tmp / mrel).parent.mkdir(parents=True, exist_ok=True)
                        (tmp / mrel).write_bytes(masks[k])
                        records[-1].update(mask=mrel, mask_sha256=_sha(masks[k]))
            elif fmt == "webdataset":
                for s in range(0, len(data), shard_size):
                    rel = f"shard-{s // shard_size:06d}.tar"
                    with tarfile.open(tmp / rel, "w") as tar:
                        for k, it, png in data[s : s + shard_size]:
                            meta = json.dumps({"seed": it["seed"], "condition": it["condition"], "label": it["label"]})
                            parts = [("png", png), ("cls", str(it["label"] if it["label"] is not None else -1).encode()),
                                     ("json", meta.encode())] + ([("mask.png", masks[k])] if k in masks else [])
                            for ext, payload in parts:
                                info = tarfile.TarInfo(f"{k:07d}.{ext}")
                                info.size, info.mtime = len(payload), 0
                                tar.addfile(info, io.BytesIO(payload))
                            records.append(_record(k, it, f"{rel}#{k:07d}.png", _sha(png)))
                            if k in masks:
                                records[-1].update(mask=f"{rel}#{k:07d}.mask.png", mask_sha256=_sha(masks[k]))
            else:
                _write_parquet(tmp, data, shard_size, class_names, name_of, records, masks)
            labels = Counter(name_of(r["label"]) for r in records)
            manifest = {
                "format": fmt,
                "num_items": len(records),
                "classes": dict(sorted(labels.items())),
                "generator": {k: src.get(k) for k in ("model_sha256", "mode", "guidance_scale", "num_inference_steps",
                                                      "sampler", "seed", "model_licence")},
                "recipe_sha256": src.get("recipe_sha256"),
                "acceptance_rate": src.get("acceptance_rate"),
                "dropped_rejected": drop_rejected,
                "privacy_audit": src.get("privacy_audit"),
                "items": records,
            }
            files = sorted({r["file"].split("#")[0] for r in records} | {r["mask"].split("#")[0] for r in records if "mask" in r})
            manifest["files"] = {f: _sha((tmp / f).read_bytes()) for f in files}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            (tmp / "DATASHEET.md").write_text(_datasheet(manifest, licence, purpose))
    finally:
        lock.release()
    return out


def _record(k: int, it: dict, rel: str, sha: str) -> dict:
    rec = {"index": k, "file": rel, "sha256": sha, "label": it["label"], "seed": it["seed"],
           "condition": it["condition"], "accepted": it.get("accepted")}
    if "nn_ratio" in it:
        rec.update(nn_ratio=it["nn_ratio"], flagged=it["flagged"])
    return rec


def _write_parquet(tmp: Path, data, shard_size, class_names, name_of, records, masks) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise SynthgenError("the hf format needs pyarrow: pip install 'synthgen[parquet]'") from e
    labels = sorted({it["label"] for _, it, _ in data if it["label"] is not None})
    names = class_names or [f"class_{i}" for i in range(max(labels) + 1)] if labels else None
    features = {"image": {"_type": "Image"}, "seed": {"dtype": "int64", "_type": "Value"},
                "condition": {"dtype": "string", "_type": "Value"}}
    if names:
        features["label"] = {"names": list(names), "_type": "ClassLabel"}
    if masks:
        features["mask"] = {"_type": "Image"}
    schema_meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    (tmp / "data").mkdir()
    for s in range(0, len(data), shard_size):
        chunk = data[s : s + shard_size]
        rel = f"data/train-{s // shard_size:05d}.parquet"
        cols = {"image": [{"bytes": png, "path": f"{k:07d}.png"} for k, _, png in chunk],
                "seed": [it["seed"] for _, it, _ in chunk], "condition": [it["condition"] for _, it, _ in chunk]}
        if names:
            cols["label"] = [it["label"] if it["label"] is not None else -1 for _, it, _ in chunk]
        if masks:
            cols["mask"] = [{"bytes": masks.get(k), "path": f"{k:07d}.mask.png"} for k, _, _ in chunk]
        table = pa.table(cols).replace_schema_metadata(schema_meta)
        pq.write_table(table, tmp / rel)
        for k, it, png in chunk:
            records.append(_record(k, it, f"{rel}#{k:07d}.png", _sha(png)))
            if k in masks:
                records[-1].update(mask=f"{rel}#{k:07d}.mask.png", mask_sha256=_sha(masks[k]))


def _datasheet(m: dict, licence: str, purpose: str | None) -> str:
    g = m["generator"]
    classes = "\n".join(f"| {c} | {n} |" for c, n in m["classes"].items())
    audit = m["privacy_audit"]
    audit_text = (json.dumps(audit, indent=1) if audit else
                  "No memorisation audit was run for this export. Do not share it outside your institution "
                  "before auditing it against the training data (nearest-neighbour check of every item).")
    n_masks = sum("mask" in r for r in m["items"])
    model_licence = ("\n### Licence of the generating model\nThe weights that generated these images carry their "
                     "training data's terms (the model's LICENSE, copied here). They may restrict what this dataset "
                     "can be used for (e.g. non-commercial use only):\n\n```\n" + g["model_licence"] + "\n```\n"
                     if g.get("model_licence") else "")
    pairs = (f"\n{n_masks} images are segmentation pairs: each comes with the label map it was generated from "
             "(16/8-bit PNG, 0 = background, 1..N = one id per nucleus), so mask and image agree by construction "
             "up to the model's mask adherence." if n_masks else "")
    return f"""# Datasheet: synthetic histopathology dataset

## Purpose
{purpose or "Synthetic image patches for training and evaluating computational-pathology models."}

## Composition
{m['num_items']} synthetic images ({m['format']} format), all generated; no real patient image is included.{pairs}

| class | items |
|---|---|
{classes}

## How it was generated
synthgen latent diffusion pipeline (model sha256 {g.get('model_sha256')}), condition mode {g.get('mode')},
guidance {g.get('guidance_scale')}, {g.get('num_inference_steps')} sampling steps ({g.get('sampler')}),
job seed {g.get('seed')}. Per-item seeds and condition kinds are in manifest.json; every file's
sha256 is listed there (check with `synthgen verify`). Class-filter acceptance rate:
{m['acceptance_rate'] if m['acceptance_rate'] is not None else 'no filter run'}; rejected items dropped:
{m['dropped_rejected']}.

## De-identification
Images are re-encoded from pixels (no EXIF/PNG/TIFF metadata), named by index; no source file
names, slide identifiers, label or macro images, reference images or condition embeddings are
included.

## Privacy audit
{audit_text}

## Intended uses
Pre-training, augmentation of rare classes, method development, teaching, sharing between
institutions after audit.

## Unintended uses
Clinical diagnosis or any decision about a patient; estimating real prevalences (class counts
were chosen, not observed); claims about real morphology not checked against real data.

## Licence
{licence}
{model_licence}"""


def verify_export(folder: str | os.PathLike) -> dict:
    """Re-hash every file and item of an export against its manifest.

    Returns:
        ``{"ok": bool, "checked": n, "problems": [...]}`` (missing, modified or unlisted files).
    """
    folder = Path(folder)
    man = folder / "manifest.json"
    if not man.exists():
        raise SynthgenError(f"{folder}: no manifest.json; not a synthgen export")
    m = json.loads(man.read_text())
    problems = []
    for rel, sha in m.get("files", {}).items():
        p = folder / rel
        if not p.exists():
            problems.append(f"missing: {rel}")
        elif _sha(p.read_bytes()) != sha:
            problems.append(f"modified: {rel}")
    listed = set(m.get("files", {})) | {"manifest.json", "DATASHEET.md"}
    for p in folder.rglob("*"):
        if p.is_file() and str(p.relative_to(folder)) not in listed:
            problems.append(f"not in manifest: {p.relative_to(folder)}")
    if m["format"] == "imagefolder":  # item checksums are the file checksums; re-check per item too
        for r in m["items"]:
            p = folder / r["file"]
            if p.exists() and _sha(p.read_bytes()) != r["sha256"]:
                problems.append(f"item {r['index']} differs from its checksum")
    return {"ok": not problems, "checked": len(m.get("files", {})), "problems": problems}
