"""``synthgen stain``: virtual IHC from H&E tiles or a slide region."""

from __future__ import annotations

from pathlib import Path

import click

from synthgen.data.slides import IMAGE_SUFFIXES
from synthgen.errors import SynthgenError

DEFAULT_PIPELINE = Path(__file__).resolve().parents[1] / "checkpoints" / "synthgen-small-cmu"


@click.command("stain")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--to", "stain", required=True, help="Target stain, e.g. ki67 (aliases such as Ki-67 work).")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Output folder (tiles) or .tif path (a slide region: pyramidal TIFF + PNG preview).")
@click.option("--pipeline", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Pipeline folder with stains/<stain>/ [default: the shipped small pipeline].")
@click.option("--structure", is_flag=True,
              help="Structure-preserving: also condition on the source's nuclei (mask branch), tiles only.")
@click.option("--x", type=int, default=0, show_default=True, help="Slide region left edge, level-0 pixels.")
@click.option("--y", type=int, default=0, show_default=True, help="Slide region top edge, level-0 pixels.")
@click.option("--size", type=click.IntRange(min=8), default=512, show_default=True,
              help="Slide region side in pixels at --mpp.")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Resolution of the model's tiles (the slide region is read at it).")
@click.option("--slide-mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Level-0 resolution of a slide without it in its metadata.")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--guidance", type=float, default=2.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def stain(source, stain, out, pipeline, structure, x, y, size, mpp, slide_mpp, steps, guidance, seed):
    """Virtual IHC of SOURCE: a folder of H&E tiles (at the model's tile size and resolution) or a
    slide / large image, of which the region (--x, --y, --size at --mpp) is translated window by
    window and written as a pyramidal TIFF that OpenSlide and QuPath open.

    The source embedding is translated into the target stain's embedding and decoded by the
    denoiser adapted to that stain (PixCell's route); --structure also keeps the source's nuclei
    in place. Score the output with `synthgen eval stain REAL_IHC VIRTUAL_IHC`.
    """
    import numpy as np
    from PIL import Image

    from synthgen.pipelines.stain import load_stain, virtual_stain

    try:
        pipe, translator = load_stain(pipeline or DEFAULT_PIPELINE, stain)
    except SynthgenError as e:
        raise click.BadParameter(str(e), param_hint="--to / --pipeline") from e
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise click.UsageError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)})")
        tiles = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]) \
            if len({Image.open(f).size for f in files}) == 1 else None
        if tiles is None:
            raise click.UsageError(f"{source}: images differ in size; virtual staining takes tiles of one size")
        images = virtual_stain(pipe, translator, tiles, stain, seeds=[seed + i for i in range(len(tiles))],
                               num_inference_steps=steps, guidance_scale=guidance, structure=structure)
        for f, im in zip(files, images, strict=True):
            dest = out / f.relative_to(source).with_suffix(".png")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp.png")
            Image.fromarray(im).save(tmp)
            tmp.replace(dest)
        click.echo(f"{len(files)} virtual {stain} tiles -> {out}")
        return
    if structure:
        raise click.UsageError("--structure works on tiles (a folder); a slide region uses the embedding route")
    path = _stain_region(pipe, translator, source, stain, out, x, y, size, mpp, slide_mpp, steps, guidance, seed)
    click.echo(f"virtual {stain}, {size}x{size} px -> {path} (+ {path.with_suffix('.png').name})")


def _stain_region(pipe, translator, source, stain, out, x, y, size, mpp, slide_mpp, steps, guidance, seed):
    import torch
    from PIL import Image

    from synthgen.data.slides import Slide
    from synthgen.pipelines.large_image import (
        generate_large,
        region_embeddings,
        write_pyramidal_tiff,
    )

    win = pipe.image_size
    with Slide(source, mpp=slide_mpp) as s:
        grid = region_embeddings(pipe, s.read(x, y, size, mpp), win // 2)
    emb = translator.translate(grid.flatten(0, 1), stain, generator=torch.Generator().manual_seed(seed))
    grid = emb.reshape(*grid.shape[:2], *emb.shape[1:])
    image = generate_large(pipe, grid, size, overlap=win // 2, seed=seed, guidance_scale=guidance,
                           num_inference_steps=steps)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_pyramidal_tiff(out, image, mpp)
    Image.fromarray(image).save(out.with_suffix(".png"))
    return out


@click.command("stain")
@click.argument("real", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("virtual", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-e", "--encoder", "encoder_spec", default=None,
              help="Encoder spec for a Frechet distance in its feature space (e.g. ssl:checkpoints/...).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the scores here.")
def eval_stain(real, virtual, encoder_spec, json_out):
    """Paired stain scores of VIRTUAL IHC tiles against the REAL IHC tiles of the same places
    (files paired by name): PSNR, SSIM, DAB- and hematoxylin-positive area fractions per tile
    (colour deconvolution) with their Pearson/Spearman correlation, and optionally a Frechet
    distance in an encoder's space. Consecutive-section pairs are never pixel-exact, so read the
    DAB correlation before the pixel scores.
    """
    import json

    import numpy as np
    from PIL import Image

    from synthgen.metrics.stain import stain_report

    files = sorted(p for p in real.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    missing = [str(f.relative_to(real)) for f in files
               if not any((virtual / f.relative_to(real)).with_suffix(s).exists() for s in (f.suffix, ".png"))]
    if not files or missing:
        raise click.UsageError(f"{virtual}: no virtual tile for {', '.join(missing[:5]) or 'any real tile'} "
                               "(tiles are paired by file name)")

    def load(folder, f):
        p = folder / f.relative_to(real)
        return np.asarray(Image.open(p if p.exists() else p.with_suffix(".png")).convert("RGB"))

    encoder = None
    if encoder_spec:
        from synthgen.encoders.load import load_encoder

        encoder = load_encoder(encoder_spec)
    rep = stain_report(np.stack([load(real, f) for f in files]), np.stack([load(virtual, f) for f in files]),
                       encoder, per_patch=False)
    d = rep["dab"]
    click.echo(f"{rep['n']} pairs: PSNR {rep['psnr']:.2f} dB, SSIM {rep['ssim']:.3f}; DAB fraction real "
               f"{d['real_mean']:.3f} virtual {d['virtual_mean']:.3f}, Pearson {d.get('pearson', float('nan')):.3f}, "
               f"Spearman {d.get('spearman', float('nan')):.3f}" + (f"; FD {rep['fd']:.3f}" if "fd" in rep else ""))
    if json_out:
        from synthgen._io import atomic_write_text

        atomic_write_text(json_out, json.dumps(rep, indent=1))
