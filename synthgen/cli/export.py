"""``synthgen export`` and ``synthgen verify``: shareable datasets with checksums."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from synthgen.cli.options import audit_threshold_option, force_option


@click.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Export folder (must not exist; written to a temporary folder and renamed when complete).")
@click.option("--format", "fmt", type=click.Choice(["imagefolder", "webdataset", "hf"]), default="imagefolder",
              show_default=True, help="ImageFolder PNGs, WebDataset tar shards, or a HuggingFace datasets parquet folder.")
@click.option("--class-names", default=None, metavar="A,B,...", help="Names of label ids 0, 1, ... for folders and features.")
@click.option("--drop-rejected", is_flag=True, help="Leave out items the class filter rejected.")
@click.option("--licence", default="CC-BY-4.0", show_default=True, help="Licence stated in DATASHEET.md.")
@click.option("--audit-against", type=click.Path(exists=True, path_type=Path), default=None,
              help="Training data of the generating model (tile table or image folder): run the memorisation audit "
                   "and gate the export on it.")
@click.option("--audit-encoder", default=None, metavar="SPEC",
              help="Encoder for the audit's feature space (e.g. ssl:checkpoints/synthgen-small-cmu/image_encoder).")
@audit_threshold_option()
@click.option("--max-flagged", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="Refuse the export when more than this fraction of items is flagged.")
@click.option("--allow-risk", is_flag=True, help="Export even when the audit flags too many items (recorded).")
@click.option("--drop-flagged", is_flag=True, help="Remove flagged items from the export.")
@force_option("the lock (.OUT.lock beside OUT) of another export to OUT")
def export(source, out, fmt, class_names, drop_rejected, licence, audit_against, audit_encoder, audit_threshold,
           max_flagged, allow_risk, drop_flagged, force):
    """Export SOURCE (a `synthgen generate` output) as a shareable dataset with manifest.json
    (per-item sha256, model hash, seeds, condition kinds) and DATASHEET.md. Images are re-encoded
    from pixels; no source names, metadata or embeddings are included."""
    from synthgen.export.writers import export_dataset
    from synthgen.workflows.audit import audit as run_audit

    names = class_names.split(",") if class_names else None
    audit = None
    if audit_against is not None:
        if not audit_encoder:
            raise click.UsageError("--audit-against needs --audit-encoder")
        audit = run_audit(source, audit_against, audit_encoder, audit_threshold)
        click.echo(f"audit: {sum(audit['flagged'])} of {len(audit['flagged'])} items flagged as near-copies "
                   f"(threshold {audit_threshold})")
    elif drop_flagged or allow_risk:
        raise click.UsageError("--drop-flagged and --allow-risk need --audit-against")
    path = export_dataset(source, out, fmt, class_names=names, drop_rejected=drop_rejected, licence=licence,
                          audit=audit, max_flagged=max_flagged, allow_risk=allow_risk, drop_flagged=drop_flagged,
                          force=force)
    click.echo(f"exported ({fmt}) -> {path}")


@click.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(export_dir):
    """Re-check every checksum of an export against its manifest (exit status 1 on any problem)."""
    from synthgen.export.writers import verify_export

    result = verify_export(export_dir)
    for p in result["problems"]:
        click.echo(p, err=True)
    if not result["ok"]:
        click.echo(f"FAILED: {len(result['problems'])} problem(s) in {export_dir}", err=True)
        sys.exit(1)
    click.echo(f"OK: {result['checked']} file(s) match manifest.json")
