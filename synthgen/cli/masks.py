"""``synthgen masks``: make condition masks for mask-guided generation and training pairs."""

from __future__ import annotations

from pathlib import Path

import click

from synthgen.cli.options import guidance_option, mpp_option, steps_option
from synthgen.data.slides import IMAGE_SUFFIXES


@click.group("masks")
def masks_group():
    """Nuclei masks: pseudo-labels of real tiles, procedural layouts, augmentation.

    Masks are label-map PNGs (0 = background, 1..N = nuclei), the format `synthgen generate
    --masks` and the mask-guided pipeline read.
    """


def _diameter(diameter: float | None, mpp: float) -> float:
    from synthgen.data.nuclei import nucleus_diameter_px

    return diameter if diameter is not None else nucleus_diameter_px(mpp)


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
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from synthgen.data.masks import write_label_map
    from synthgen.data.nuclei import segment_nuclei

    d = _diameter(diameter, mpp)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise click.UsageError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)})")
        items = ((p.relative_to(source).with_suffix(".png"), lambda p=p: np.asarray(Image.open(p).convert("RGB")))
                 for p in files)
        total, mask_dir, image_dir = len(files), out, None
    else:
        from synthgen.data.datasets import PatchDataset

        ds = PatchDataset(source)
        items = ((Path(f"{i:06d}.png"), lambda i=i: ds[i]["image"].permute(1, 2, 0).numpy()) for i in range(len(ds)))
        total, mask_dir, image_dir = len(ds), out / "masks", out / "images"
    counts = []
    for rel, load in tqdm(items, total=total, desc="nuclei", unit="img"):
        img = load()
        mask = segment_nuclei(img, diameter=d)
        counts.append(int(mask.max()))
        (mask_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        write_label_map(mask_dir / rel, mask)
        if image_dir is not None:
            (image_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(image_dir / rel)
        if overlay:
            _save_overlay(img, mask, out / "overlays" / rel)
    click.echo(f"{total} masks ({np.mean(counts):.1f} nuclei per image) -> {mask_dir}")


def _save_overlay(img, mask, path: Path) -> None:
    from PIL import Image
    from skimage.segmentation import find_boundaries

    ov = img.copy()
    ov[find_boundaries(mask, mode="inner")] = (0, 255, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ov).save(path)


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
    import numpy as np

    from synthgen.data.masks import write_label_map
    from synthgen.data.nuclei import procedural_nuclei

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    d = _diameter(diameter, mpp)
    for i in range(num):
        write_label_map(out / f"{i:06d}.png", procedural_nuclei(size, density, d, elongation=elongation, seed=rng))
    click.echo(f"{num} procedural masks ({size} px, density {density}, diameter {d:.1f} px) -> {out}")


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
    import numpy as np

    from synthgen.data.masks import label_map_files, read_label_map, write_label_map
    from synthgen.data.nuclei import augment_mask

    files = label_map_files(source)
    if not files:
        raise click.UsageError(f"{source}: no label-map images (.png, .tif)")
    rng = np.random.default_rng(seed)
    d = _diameter(diameter, mpp)
    out.mkdir(parents=True, exist_ok=True)
    for p in files:
        mask = read_label_map(p)
        for k in range(copies):
            aug, _ = augment_mask(mask, seed=rng, elastic=elastic, remove=remove, add=add, diameter=d)
            write_label_map(out / f"{p.stem}-{k}.png", aug)
    click.echo(f"{len(files) * copies} masks -> {out}")


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
    import json

    import numpy as np
    from PIL import Image

    from synthgen.data.masks import read_label_map
    from synthgen.metrics.masks import adherence_study
    from synthgen.pipelines.generate import SynthPipeline

    mask_dir = pairs / "masks" if (pairs / "masks").is_dir() else pairs
    files = sorted(mask_dir.glob("*.png"))[:num]
    if not files:
        raise click.UsageError(f"{mask_dir}: no label-map PNGs")
    pipe = SynthPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.image_size
    masks = np.stack([read_label_map(f, size=(size, size)) for f in files])
    embeddings = None
    if (pairs / "images").is_dir():
        missing = [f.name for f in files if not (pairs / "images" / f.name).exists()]
        if missing:
            raise click.UsageError(f"{pairs / 'images'}: no image for masks {', '.join(missing[:5])}")
        imgs = np.stack([np.asarray(Image.open(pairs / "images" / f.name).convert("RGB")) for f in files])
        embeddings = pipe.encode_images(imgs)
    rep = adherence_study(pipe, masks, embeddings, num_inference_steps=steps, guidance_scale=guidance)
    images = rep.pop("images")
    rep.update(pipeline=str(pipeline), pairs=str(pairs), condition="tile embedding" if embeddings is not None
               else "mask only", steps=steps, guidance=guidance)
    for arm in ("controlnet", "baseline"):
        r = rep[arm]
        click.echo(f"{arm:>10}: Dice {r['dice']:.3f}  object F1 {r['object_f1']:.3f} "
                   f"(P {r['object_precision']:.3f} R {r['object_recall']:.3f}, {r['num_images']} images)")
    if json_out:
        from synthgen._io import atomic_write_text

        atomic_write_text(json_out, json.dumps(rep, indent=1))
    if grid:
        _pairs_grid(masks, images["controlnet"], images["baseline"], grid)


def _pairs_grid(masks, guided, plain, path: Path, rows: int = 8) -> None:
    import numpy as np
    from PIL import Image
    from skimage.segmentation import find_boundaries

    tiles = []
    for m, a, b in list(zip(masks, guided, plain, strict=True))[:rows]:
        outline = np.full(a.shape, 255, np.uint8)
        outline[m > 0] = (200, 200, 230)
        outline[find_boundaries(m, mode="inner")] = (40, 40, 160)
        tiles.append(np.concatenate([outline, a, b], 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = Image.fromarray(np.concatenate(tiles, 0))
    scale = max(1, 192 // masks.shape[-1])  # small tiles are upscaled (nearest) so nuclei are visible
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)
