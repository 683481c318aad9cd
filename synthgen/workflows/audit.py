"""The memorisation audit of a ``synthgen generate`` output against the model's training data."""

from __future__ import annotations

from pathlib import Path

from synthgen.errors import SynthgenError
from synthgen.workflows.datasets import image_set


def audit(source: Path, real: Path, encoder_spec: str, threshold: float) -> dict:
    """:func:`synthgen.metrics.privacy.memorization_audit` of the items of ``source`` (a generate
    output) against ``real`` (a tile table or image folder), in the feature space of
    ``encoder_spec`` and on thumbnails; folder images are resized to the generated images' side."""
    import torch

    from synthgen.encoders.load import load_encoder
    from synthgen.metrics.fidelity import extract_features
    from synthgen.metrics.privacy import memorization_audit, thumbnails

    source, real = Path(source), Path(real)
    if not (source / "manifest.json").is_file():
        raise SynthgenError(f"{source / 'manifest.json'}: missing; the audit checks a `synthgen generate` output")
    synth = image_set(source)  # its manifest's items
    side = synth[0]["image"].shape[-1]
    real_ds = image_set(real, side if real.is_dir() else None)
    enc = load_encoder(encoder_spec)
    fs, _ = extract_features(enc, synth)
    fr, _ = extract_features(enc, real_ds)
    ps = thumbnails(torch.stack([synth[i]["image"] for i in range(len(synth))]))
    pr = thumbnails(torch.stack([real_ds[i]["image"] for i in range(len(real_ds))]))
    return memorization_audit(fs, fr, ps, pr, threshold=threshold)
