"""What ``synthgen eval fidelity``, ``eval utility`` and ``eval report`` do: fidelity of a synthetic
set against a real one (with an encoder, and encoder-free beside its real-vs-real floor), the
train-on-synthetic utility study, and the combined report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from synthgen.config import ConfigError


def _write_json(path: Path | None, obj) -> None:
    if path is not None:
        from synthgen._io import atomic_write_text

        atomic_write_text(path, json.dumps(obj, indent=1))


@dataclass(frozen=True)
class FidelityJob:
    """``synth`` against ``real`` (image folders, ``synthgen generate`` outputs or tile tables, read
    by :func:`~synthgen.workflows.datasets.image_set`, resized to ``size`` when given). ``encoder``:
    an encoder spec (FD, KID, precision/recall/density/coverage with ``k`` neighbours, an FD
    interval from ``n_bootstrap`` resamples); the encoder-free FD is always computed (its real
    halves drawn with ``seed``)."""

    real: Path
    synth: Path
    encoder: str | None = None
    size: int | None = None
    k: int = 5
    n_bootstrap: int = 100
    seed: int = 0
    json_out: Path | None = None


def fidelity(job: FidelityJob) -> dict:
    """Run a :class:`FidelityJob`: the report (``overall`` / ``per_class`` with an encoder,
    ``encoder_free`` always; ``encoder_free.skipped`` when it cannot be computed), with ``n_real``
    and ``n_synth``; also written to ``json_out``."""
    from synthgen.encoders.load import load_encoder
    from synthgen.metrics.fidelity import extract_features, fidelity_report
    from synthgen.metrics.handcrafted import encoder_free_report
    from synthgen.workflows.datasets import image_set

    real_ds, synth_ds = image_set(job.real, job.size), image_set(job.synth, job.size)
    report: dict = {}
    if job.encoder:
        encoder = load_encoder(job.encoder)
        fr, lr = extract_features(encoder, real_ds)
        fs, ls = extract_features(encoder, synth_ds)
        report = fidelity_report(fr, fs, lr, ls, k=job.k, n_bootstrap=job.n_bootstrap)
    try:
        report["encoder_free"] = encoder_free_report(real_ds, synth_ds, seed=job.seed)
    except ValueError as e:
        report["encoder_free"] = {"skipped": f"could not compute: {e}"}
    _write_json(job.json_out, report)
    return {**report, "n_real": len(real_ds), "n_synth": len(synth_ds)}


@dataclass(frozen=True)
class UtilityJob:
    """The utility study (:func:`synthgen.studies.utility.utility_study`) of ``pipeline``'s samples
    on two ImageFolder layouts with the same classes, images resized to ``size``; ``mode``: a
    generation mode (``prior`` reads ``prior`` or the pipeline's own), ``seeds`` repeats,
    ``epochs`` per classifier, ``steps`` sampling steps."""

    train_dir: Path
    test_dir: Path
    pipeline: Path
    mode: str = "variations"
    size: int = 64
    seeds: int = 5
    epochs: int = 20
    steps: int = 8
    prior: Path | None = None
    json_out: Path | None = None


def utility(job: UtilityJob) -> dict:
    """Run a :class:`UtilityJob`: the study's report with the class names and the generator's mode
    (and prior); also written to ``json_out``.

    Raises:
        ConfigError: class sub-folders that differ between the two sets, or a prior without mode prior.
    """
    from synthgen.augment import PipelineGenerator
    from synthgen.data.datasets import ImageListDataset
    from synthgen.studies.utility import utility_study

    train = ImageListDataset.from_folder(job.train_dir, size=job.size)
    test = ImageListDataset.from_folder(job.test_dir, size=job.size)
    if train.labels is None or test.labels is None or train.classes != test.classes:
        raise ConfigError("TRAIN_DIR and TEST_DIR need the same class sub-folders")
    if job.prior is not None and job.mode != "prior":
        raise ConfigError("--prior is for --mode prior")
    kw = {"classes": train.classes, "prior": job.prior} if job.mode == "prior" else {}
    gen = PipelineGenerator(str(job.pipeline), mode=job.mode, num_inference_steps=job.steps, **kw)
    rep = utility_study(train, test, train.labels, gen, seeds=tuple(range(job.seeds)), epochs=job.epochs)
    source = {"mode": gen.mode, **({"prior": str(gen.prior_source)} if job.mode == "prior" else {})}
    rep = {"classes": train.classes, "generator": source, **rep}
    _write_json(job.json_out, rep)
    return rep


@dataclass(frozen=True)
class ReportJob:
    """One report on ``synth`` against ``real`` into ``out`` (:func:`synthgen.metrics.report.write_report`):
    fidelity with ``encoder``, the memorisation audit against ``audit_against`` (needs ``encoder``),
    the utility study (``utility``: a :class:`UtilityJob`, or ``utility_json``: a saved result), and
    saved mask-adherence / stain scores."""

    real: Path
    synth: Path
    out: Path
    encoder: str | None = None
    size: int | None = None
    k: int = 5
    n_bootstrap: int = 100
    audit_against: Path | None = None
    audit_threshold: float = 0.5
    utility: UtilityJob | None = None
    utility_json: Path | None = None
    masks: Path | None = None
    stain: Path | None = None


def report(job: ReportJob) -> dict:
    """Run a :class:`ReportJob`; returns :func:`write_report`'s summary.

    Raises:
        ConfigError: both a utility study and a saved one, or an audit without an encoder.
    """
    from synthgen.encoders.load import load_encoder
    from synthgen.metrics.report import write_report
    from synthgen.workflows.datasets import image_set, mask_pairs

    if job.utility is not None and job.utility_json is not None:
        raise ConfigError("give either the utility study options or --utility-json, not both")
    if job.audit_against is not None and not job.encoder:
        raise ConfigError("--audit-against needs --encoder")
    encoder = load_encoder(job.encoder) if job.encoder else None
    real_ds, synth_ds = image_set(job.real, job.size), image_set(job.synth, job.size)
    audit_ds = None
    if job.audit_against is not None:
        audit_ds = real_ds if job.audit_against == job.real else image_set(job.audit_against, job.size)
    study = utility(job.utility) if job.utility is not None else job.utility_json
    return write_report(job.out, real_ds, synth_ds, encoder, utility=study, audit_train=audit_ds,
                        audit_threshold=job.audit_threshold, masks=job.masks, stain=job.stain, k=job.k,
                        n_bootstrap=job.n_bootstrap,
                        sources={"real": str(job.real), "synthetic": str(job.synth), "encoder": job.encoder},
                        mask_pairs=mask_pairs(job.synth))
