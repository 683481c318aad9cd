"""``synthgen masks``: make condition masks for mask-guided generation and training pairs."""

from __future__ import annotations

from pathlib import Path

import click

from synthgen.cli.options import guidance_option, mpp_option, run_workflow, steps_option


@click.group("masks")
def masks_group():
    """Nuclei masks: pseudo-labels of real tiles, procedural layouts, augmentation.

    Masks are label-map PNGs (0 = background, 1..N = nuclei), the format `synthgen generate
    --masks` and the mask-guided pipeline read.
    """


_DIAMETER_HELP = "Mean nucleus diameter in pixels [default: 7 um at --mpp]."


@masks_group.command("nuclei")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@mpp_option(default=1.0)
@click.option("--diameter", type=click.FloatRange(min=1, min_open=True), default=None, help=_DIAMETER_HELP)
@click.option("--overlay", is_flag=True, help="Also write overlays (nucleus outlines on the image) for checking.")
def masks_nuclei(source, out, mpp, diameter, overlay):
    """Pseudo-label the nuclei of real H&E tiles (hematoxylin by colour deconvolution, threshold,
    watershed split of touching nuclei).

    SOURCE is an image folder (masks mirror its relative paths under OUT) or a tile table from
    `synthgen tile` (writes OUT/images/NNNNNN.png and OUT/masks/NNNNNN.png: a segmentation
    dataset that `synthgen cache` reads with its masks).
    """
    from synthgen.workflows.masks import NucleiJob, nuclei

    job = NucleiJob(source=source, out=out, mpp=mpp, diameter=diameter, overlay=overlay)
    r = run_workflow(nuclei, job)
    click.echo(f"{r.num_masks} masks ({r.mean_nuclei:.1f} nuclei per image) -> {r.mask_dir}")


@masks_group.command("procedural")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("-n", "--num", type=click.IntRange(min=1), required=True, help="Masks to make.")
@click.option("--size", type=click.IntRange(min=8), default=64, show_default=True, help="Mask side in pixels.")
@click.option("--density", type=click.FloatRange(0, 0.9, max_open=True), default=0.2, show_default=True,
              help="Fraction of the area covered by nuclei.")
@mpp_option(default=1.0)
@click.option("--diameter", type=click.FloatRange(min=1, min_open=True), default=None, help=_DIAMETER_HELP)
@click.option("--elongation", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Up to this relative ellipticity (0: round nuclei).")
@click.option("--seed", type=int, default=0, show_default=True)
def masks_procedural(out, num, size, density, mpp, diameter, elongation, seed):
    """Random layouts of star-convex nuclei with density and size control."""
    from synthgen.workflows.masks import ProceduralJob, procedural

    r = procedural(ProceduralJob(out=out, num=num, size=size, density=density, mpp=mpp, diameter=diameter,
                                 elongation=elongation, seed=seed))
    click.echo(f"{num} procedural masks ({size} px, density {density}, diameter {r.diameter:.1f} px) -> {out}")


@masks_group.command("augment")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--copies", type=click.IntRange(min=1), default=4, show_default=True, help="Variants per mask.")
@click.option("--elastic", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Elastic displacement amplitude in pixels (0: off).")
@click.option("--remove", type=click.FloatRange(0, 1), default=0.1, show_default=True, help="Fraction of nuclei removed.")
@click.option("--add", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="New nuclei, as a fraction of the current count.")
@mpp_option(default=1.0)
@click.option("--diameter", type=click.FloatRange(min=1, min_open=True), default=None, help=_DIAMETER_HELP)
@click.option("--seed", type=int, default=0, show_default=True)
def masks_augment(source, out, copies, elastic, remove, add, mpp, diameter, seed):
    """Variants of the label maps in SOURCE: flips/rotations, elastic warps, removed and added nuclei."""
    from synthgen.workflows.masks import AugmentMasksJob, augment

    job = AugmentMasksJob(source=source, out=out, copies=copies, elastic=elastic, remove=remove, add=add, mpp=mpp,
                          diameter=diameter, seed=seed)
    r = run_workflow(augment, job)
    click.echo(f"{r.num_masks} masks -> {out}")


@click.command("masks")
@click.argument("pipeline", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("pairs", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-n", "--num", type=click.IntRange(min=1), default=None, help="Use the first N masks [default: all].")
@steps_option()
@guidance_option()
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the scores here.")
@click.option("--grid", type=click.Path(path_type=Path), default=None,
              help="PNG grid: condition mask outlines, mask-guided image, baseline image (rows of three).")
def eval_masks(pipeline, pairs, num, steps, guidance, json_out, grid):
    """Mask adherence of PIPELINE's mask branch beside the same model without it.

    PAIRS is a folder with masks/ (label maps) and, optionally, images/ (the real tiles they
    came from, same names: `synthgen masks nuclei TILES -o PAIRS` writes both). With images,
    each mask is generated with the embedding of its own tile; without, from the mask alone.
    Each generated image is re-segmented with the nuclei pseudo-labeller; Dice and object F1
    (IoU >= 0.5) against the condition mask are reported for both arms.
    """
    from synthgen.workflows.masks import MaskEvalJob, evaluate

    job = MaskEvalJob(pipeline=pipeline, pairs=pairs, num=num, steps=steps, guidance=guidance, json_out=json_out,
                      grid=grid)
    rep = run_workflow(evaluate, job)
    for arm in ("controlnet", "baseline"):
        r = rep[arm]
        click.echo(f"{arm:>10}: Dice {r['dice']:.3f}  object F1 {r['object_f1']:.3f} "
                   f"(P {r['object_precision']:.3f} R {r['object_recall']:.3f}, {r['num_images']} images)")
