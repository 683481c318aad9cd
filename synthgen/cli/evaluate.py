"""``synthgen eval``: fidelity, utility and the combined report."""

from __future__ import annotations

from pathlib import Path

import click

from synthgen.cli.options import audit_threshold_option, run_workflow
from synthgen.encoders.load import SPEC_HELP


@click.group("eval")
def eval_group():
    """Evaluate synthetic data: fidelity, utility, and one combined report."""


def _study_options(f):
    """Options of the utility study, shared by `eval utility` and `eval report`."""
    for opt in reversed([
        click.option("--mode", type=click.Choice(["variations", "variation", "class", "prior"]), default="variations",
                     show_default=True,
                     help="variations (or variation): condition on embeddings of real training images; class: class-conditional "
                          "model; prior: fresh samples of each class from an embedding prior (class sub-folder "
                          "names matched to the prior's class names, a leading '01_' ignored)."),
        click.option("--prior", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="--mode prior: the EmbeddingPrior folder (default: the pipeline's prior/)."),
        click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True,
                     help="Repeats with different seeds."),
        click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True),
        click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True, help="Sampling steps."),
    ]):
        f = opt(f)
    return f


def _echo_encoder_free(free: dict) -> None:
    """The encoder-free FD lines of a report (or why it was not computed)."""
    from synthgen.metrics.handcrafted import format_report

    if "skipped" in free:
        click.echo(f"encoder-free FD not computed: {free['skipped']}")
        return
    for line in format_report(free):
        click.echo(line)


@eval_group.command("fidelity")
@click.argument("real", type=click.Path(exists=True, path_type=Path))
@click.argument("synth", type=click.Path(exists=True, path_type=Path))
@click.option("-e", "--encoder", "encoder_spec", default=None, metavar="SPEC",
              help="Feature extractor: " + SPEC_HELP + ". Use a pathology encoder (e.g. timm:hf-hub:MahmoodLab/UNI2-h) "
                   "rather than Inception. Without it only the encoder-free FD is reported.")
@click.option("--size", type=click.IntRange(min=8), default=None, help="Resize images to this square size first.")
@click.option("--k", type=click.IntRange(min=1), default=5, show_default=True, help="Neighbours for precision/recall.")
@click.option("--bootstrap", "n_bootstrap", type=click.IntRange(min=0), default=100, show_default=True,
              help="Bootstrap resamples for the FD confidence interval.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the encoder-free FD's random real halves.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the report here.")
def eval_fidelity(real, synth, encoder_spec, size, k, n_bootstrap, seed, json_out):
    """Frechet distance, KID, precision/recall/density/coverage of SYNTH against REAL, and the
    encoder-free FD (hand-crafted stain, colour, texture, nuclei and sharpness features) beside
    its real-vs-real floor and blurred / stain-shifted copies of the real set, measured in the
    same run.

    REAL and SYNTH are image folders (ImageFolder layout gives per-class results),
    `synthgen generate` outputs (labels read from manifest.json) or tile tables.
    """
    from synthgen.workflows.evaluate import FidelityJob, fidelity

    job = FidelityJob(real=real, synth=synth, encoder=encoder_spec, size=size, k=k, n_bootstrap=n_bootstrap,
                      seed=seed, json_out=json_out)
    report = run_workflow(fidelity, job)
    if encoder_spec:
        o = report["overall"]
        click.echo(f"real {o['n_real']}  synthetic {o['n_fake']}  ({encoder_spec})")
        click.echo(f"FD {o['fd']['value']:.4f} (95% CI {o['fd']['ci95'][0]:.4f}-{o['fd']['ci95'][1]:.4f})   "
                   f"KID {o['kid']['value']:.5f} +- {o['kid']['std']:.5f}")
        if "precision" in o:
            click.echo("precision {:.3f}  recall {:.3f}  density {:.3f}  coverage {:.3f}".format(
                *(o[m]["value"] for m in ("precision", "recall", "density", "coverage"))))
        for c, r in report.get("per_class", {}).items():
            click.echo(f"  class {c}: FD {r['fd']['value']:.4f}  KID {r['kid']['value']:.5f}  "
                       f"(n={r['n_real']}/{r['n_fake']})")
    else:
        click.echo(f"real {report['n_real']}  synthetic {report['n_synth']}  (no encoder: encoder-free FD only)")
    _echo_encoder_free(report["encoder_free"])


@eval_group.command("utility")
@click.argument("train_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("test_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--pipeline", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="SynthPipeline folder generating the synthetic samples.")
@click.option("--size", type=click.IntRange(min=8), default=64, show_default=True, help="Image size for the classifier.")
@_study_options
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the report here.")
def eval_utility(train_dir, test_dir, pipeline, mode, prior, size, seeds, epochs, steps, json_out):
    """Train-on-synthetic utility: a small classifier trained on real, real + classical augmentation,
    real + oversampling + augmentation (the baseline to beat), real + synthgen samples + augmentation
    (the same number of extra samples: classes balanced up to 1:3) and synthetic only, tested on
    TEST_DIR; balanced accuracy and rare-class recall with 95% intervals over the seeds.

    TRAIN_DIR and TEST_DIR are ImageFolder layouts (one sub-folder per class).
    """
    from synthgen.workflows.evaluate import UtilityJob, utility

    job = UtilityJob(train_dir=train_dir, test_dir=test_dir, pipeline=pipeline, mode=mode, size=size, seeds=seeds,
                     epochs=epochs, steps=steps, prior=prior, json_out=json_out)
    rep = run_workflow(utility, job)
    click.echo(f"rare class: {rep['classes'][rep['rare_class']]}; train counts "
               + ", ".join(f"{rep['classes'][c]} {n}" for c, n in rep["train_counts"].items()))
    for arm, r in rep["arms"].items():
        ba, rr = r["balanced_accuracy"], r["rare_class_recall"]
        click.echo(f"{arm:15s} balanced accuracy {ba['mean']:.3f} [{ba['ci95'][0]:.3f}, {ba['ci95'][1]:.3f}]   "
                   f"rare-class recall {rr['mean']:.3f} [{rr['ci95'][0]:.3f}, {rr['ci95'][1]:.3f}]")


@eval_group.command("report")
@click.argument("real", type=click.Path(exists=True, path_type=Path))
@click.argument("synth", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Report folder: report.html, report.md, report.json, PNG plots and sample grids.")
@click.option("-e", "--encoder", "encoder_spec", default=None, metavar="SPEC",
              help="Feature extractor for fidelity and the privacy audit (both skipped without it): " + SPEC_HELP)
@click.option("--size", type=click.IntRange(min=8), default=None, help="Resize images to this square size first.")
@click.option("--k", type=click.IntRange(min=1), default=5, show_default=True, help="Neighbours for precision/recall.")
@click.option("--bootstrap", "n_bootstrap", type=click.IntRange(min=0), default=100, show_default=True,
              help="Bootstrap resamples for the FD confidence interval.")
@click.option("--audit-against", type=click.Path(exists=True, path_type=Path), default=None,
              help="Training data of the generating model (tile table or image folder): run the memorisation audit.")
@audit_threshold_option()
@click.option("--utility-train", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Utility study: real training images (ImageFolder layout); with --utility-test and --pipeline.")
@click.option("--utility-test", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Utility study: held-out real test images (same class sub-folders).")
@click.option("--pipeline", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Utility study: SynthPipeline folder generating the synthetic samples.")
@click.option("--utility-size", type=click.IntRange(min=8), default=64, show_default=True,
              help="Utility study: image size for the classifier.")
@_study_options
@click.option("--utility-json", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Use a saved `synthgen eval utility --json` result instead of running the study.")
@click.option("--masks", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Mask-adherence results to include (`synthgen eval masks --json`, or any JSON of numbers).")
@click.option("--stain", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Stain-translation scores (JSON of numbers, any nesting) to include.")
def eval_report(real, synth, out, encoder_spec, size, k, n_bootstrap, audit_against, audit_threshold, utility_train,
                utility_test, pipeline, utility_size, mode, prior, seeds, epochs, steps, utility_json, masks, stain):
    """One report on SYNTH against REAL: fidelity, utility, privacy audit, mask adherence and stain
    scores, as OUT/report.md with PNG plots and a real-vs-synthetic sample grid, and the same as one
    self-contained page, OUT/report.html (images inlined; opens from the file system).

    REAL and SYNTH are read as in `eval fidelity`. Sections whose inputs are not given are
    skipped, and the report says which and why.
    """
    from synthgen.workflows.evaluate import ReportJob, UtilityJob, report

    study = {"--utility-train": utility_train, "--utility-test": utility_test, "--pipeline": pipeline}
    given = [name for name, v in study.items() if v is not None]
    if given and len(given) < 3:
        raise click.UsageError(f"{', '.join(given)} need(s) {', '.join(n for n in study if n not in given)} too")
    util = UtilityJob(train_dir=utility_train, test_dir=utility_test, pipeline=pipeline, mode=mode, size=utility_size,
                      seeds=seeds, epochs=epochs, steps=steps, prior=prior) if given else None
    job = ReportJob(real=real, synth=synth, out=out, encoder=encoder_spec, size=size, k=k, n_bootstrap=n_bootstrap,
                    audit_against=audit_against, audit_threshold=audit_threshold, utility=util,
                    utility_json=utility_json, masks=masks, stain=stain)
    rep = run_workflow(report, job)
    for name, reason in rep["skipped"].items():
        click.echo(f"skipped {name}: {reason}")
    _echo_encoder_free(rep["encoder_free"])
    click.echo(f"report ({', '.join(rep['sections']) or 'samples only'}) -> {out / 'report.md'}, {out / 'report.html'}")
