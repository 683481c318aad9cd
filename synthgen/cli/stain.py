"""``synthgen stain``: virtual IHC from H&E tiles or a slide region."""

from __future__ import annotations

from pathlib import Path

import click

from synthgen.cli.options import guidance_option, mpp_option, seed_option, steps_option
from synthgen.data.slides import IMAGE_SUFFIXES
from synthgen.errors import SynthgenError
from synthgen.workflows.stain import DEFAULT_PIPELINE


@click.command("stain")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--to", "stain", required=True, help="Target stain, e.g. panck or ki67 (aliases such as Ki-67 work); the pipeline needs stains/<stain>/.")
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
@mpp_option("Resolution of the model's tiles (the slide region is read at it) [default: the pipeline's "
            "recorded scale, else 1.0].")
@mpp_option("Level-0 resolution of a slide without it in its metadata.", name="--slide-mpp")
@steps_option()
@guidance_option()
@seed_option("Job seed: tile or window i gets seed*1000000 + i.")
@click.option("--route", type=click.Choice(["embedding", "spatial"]), default=None,
              help="embedding: PixCell's route (with --structure, the source's nuclei too); spatial: the "
                   "translator that sees the source tile [default: embedding where the stain has it].")
@click.option("--image-guidance", type=float, default=None,
              help="Spatial translators: guidance on the source image, separate from --guidance on the "
                   "stain embedding (InstructPix2Pix) [default: none, the source is always given].")
@click.option("--keep-glass/--no-keep-glass", "glass", default=True, show_default=True,
              help="Where the source is glass, keep glass (the models only know tissue), in tiles and regions.")
def stain(source, stain, out, pipeline, structure, x, y, size, mpp, slide_mpp, steps, guidance, seed, route,
          image_guidance, glass):
    """Virtual IHC of SOURCE: a folder of H&E tiles (at the model's tile size and resolution) or a
    slide / large image, of which the region (--x, --y, --size at --mpp) is translated window by
    window and written as a pyramidal TIFF that OpenSlide and QuPath open.

    The source embedding is translated into the target stain's embedding and decoded by the
    denoiser adapted to that stain (PixCell's route); --structure also keeps the source's nuclei
    in place. --route spatial uses the translator that sees the source tile itself (shipped for
    Ki67 and PanCK; not yet better than --structure, see the model card). Score the output with
    `synthgen eval stain REAL_IHC VIRTUAL_IHC --source SOURCE`.
    """
    from synthgen.config import ConfigError
    from synthgen.errors import StainError
    from synthgen.workflows.stain import StainJob, load, stain_folder, stain_region

    job = StainJob(to=stain, out=out, pipeline=pipeline or DEFAULT_PIPELINE, route=route, structure=structure,
                   image_guidance=image_guidance, steps=steps, guidance=guidance, seed=seed, glass=glass, x=x, y=y,
                   size=size, mpp=mpp, slide_mpp=slide_mpp)
    try:
        loaded = load(job)
    except StainError as e:
        raise click.BadParameter(str(e), param_hint="--to / --pipeline") from e
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    try:
        if source.is_dir():
            n = stain_folder(job, source, loaded)
            click.echo(f"{n} virtual {stain} tiles -> {out}")
            return
        path = stain_region(job, source, loaded)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    click.echo(f"virtual {stain}, {size}x{size} px -> {path} (+ {path.with_suffix('.png').name})")


@click.command("stain")
@click.argument("real", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("virtual", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-e", "--encoder", "encoder_spec", default=None,
              help="Encoder spec for a Frechet distance in its feature space (e.g. ssl:checkpoints/...).")
@click.option("--source", "source_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The source (H&E) tiles the virtual ones were made from (same file names): adds the structure "
                   "score, Dice of the source's nuclei vs the virtual tile's.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the scores here.")
def eval_stain(real, virtual, encoder_spec, source_dir, json_out):
    """Paired stain scores of VIRTUAL IHC tiles against the REAL IHC tiles of the same places
    (files paired by name): PSNR, SSIM, DAB- and hematoxylin-positive area fractions per tile
    (colour deconvolution) with their Pearson/Spearman correlation, the Frechet distance of
    hand-crafted colour and texture features (no encoder) and optionally one in an encoder's
    space; with --source, the structure score (does the virtual tile keep the source's nuclei
    where they are?). Consecutive-section pairs are never pixel-exact, so read the DAB
    correlation and the structure score before the pixel scores.
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

    if source_dir is not None:
        gone = [str(f.relative_to(real)) for f in files
                if not any((source_dir / f.relative_to(real)).with_suffix(s).exists() for s in (f.suffix, ".png"))]
        if gone:
            raise click.UsageError(f"{source_dir}: no source tile for {', '.join(gone[:5])} (tiles are paired by name)")

    def load(folder, f):
        p = folder / f.relative_to(real)
        return np.asarray(Image.open(p if p.exists() else p.with_suffix(".png")).convert("RGB"))

    encoder = None
    if encoder_spec:
        from synthgen.encoders.load import load_encoder

        encoder = load_encoder(encoder_spec)
    src = None if source_dir is None else np.stack([load(source_dir, f) for f in files])
    rep = stain_report(np.stack([load(real, f) for f in files]), np.stack([load(virtual, f) for f in files]),
                       encoder, per_patch=False, source=src, encoder_free=True)
    d = rep["dab"]
    click.echo(f"{rep['n']} pairs: PSNR {rep['psnr']:.2f} dB, SSIM {rep['ssim']:.3f}; DAB fraction real "
               f"{d['real_mean']:.3f} virtual {d['virtual_mean']:.3f}, Pearson {d.get('pearson', float('nan')):.3f}, "
               f"Spearman {d.get('spearman', float('nan')):.3f}; encoder-free FD {rep['fd_free']:.2f}"
               + (f"; FD {rep['fd']:.3f}" if "fd" in rep else "")
               + (f"; structure Dice {rep['structure']['dice']:.3f} (real IHC vs source: "
                  f"{rep['structure_real']['dice']:.3f})" if src is not None else ""))
    if json_out:
        from synthgen._io import atomic_write_text

        atomic_write_text(json_out, json.dumps(rep, indent=1))


def _band(ctx, param, value):
    if value is None:
        return None
    try:
        x0, x1 = (float(v) for v in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"expected X0:X1 (fractions of the width, e.g. 0.4:0.6), got {value!r}") from None
    if not 0.0 <= x0 < x1 <= 1.0:
        raise click.BadParameter(f"need 0 <= X0 < X1 <= 1, got {value!r}")
    return x0, x1


@click.command("pairs")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("target", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False)
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: trainA/trainB (and testA/testB with --holdout), pix2pix layout.")
@click.option("--source-landmarks", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Landmark CSV of SOURCE (ANHIR layout); with --target-landmarks the affine fit is used.")
@click.option("--target-landmarks", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Landmark CSV of TARGET, same points in the same order.")
@click.option("--deepliif", is_flag=True,
              help="SOURCE is a DeepLIIF strip (hematoxylin -> Ki67 panels, aligned); no TARGET.")
@click.option("--size", type=click.IntRange(min=8), default=64, show_default=True, help="Patch side in pixels.")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Training patch stride [default: --size].")
@click.option("--test-stride", type=click.IntRange(min=1), default=None, help="Test patch stride [default: --size].")
@click.option("--min-tissue", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Tissue fraction each patch needs in both stains.")
@click.option("--holdout", callback=_band, default=None, metavar="X0:X1",
              help="Vertical band (fractions of the width) kept for testing; training patches never touch it.")
@click.option("--dihedral", is_flag=True, help="Write the 8 rotations/flips of every training patch.")
@click.option("--downsample", type=click.IntRange(min=1), default=1, show_default=True,
              help="Shrink both images by this integer factor (box filter) before cutting, e.g. 4 for "
                   "DeepLIIF's ~0.25 um/px panels -> ~1 um/px.")
@click.option("--stain", default=None,
              help="With a pair split file as SOURCE (.csv): the target stain whose rows to cut, e.g. ki67.")
def pairs(source, target, out, source_landmarks, target_landmarks, deepliif, size, stride, test_stride, min_tissue,
          holdout, dihedral, downsample, stain):
    """Cut aligned patch pairs of two stains into pix2pix-style folders (the input of
    `synthgen cache` for training a virtual stain).

    Consecutive sections (SOURCE = H&E, TARGET = IHC) are registered by landmarks when both CSV
    files are given, else by intensity; a DeepLIIF strip (--deepliif) is split into its
    hematoxylin and Ki67 panels. Example (ANHIR rat kidney, H&E -> PanCytokeratin):

    \b
      synthgen pairs Rat-Kidney_HE.jpg Rat-Kidney_PanCytokeratin.jpg -o runs/panck/pairs \\
          --source-landmarks Rat-Kidney_HE.csv --target-landmarks Rat-Kidney_PanCytokeratin.csv \\
          --size 64 --stride 16 --test-stride 32 --holdout 0.4:0.6 --dihedral

    SOURCE can also be a pair split file (.csv, e.g. recipes/data/stain_pairs.csv): every row of
    --stain is registered or aligned, downsampled and split as its row says (test: empty for
    training only, 'all' for a held-out image, X0:X1 for a held-out band), into one folder:

    \b
      synthgen pairs recipes/data/stain_pairs.csv --stain ki67 -o runs/ki67/pairs --size 64 --stride 16 --dihedral
    """
    from synthgen.data.pair_folders import downsample_pair, table_pairs, write_pair_folders
    from synthgen.data.pairs import deepliif_pair, register_sections

    if source.suffix.lower() == ".csv":
        given = [n for n, v in (("TARGET", target), ("--source-landmarks", source_landmarks),
                                ("--target-landmarks", target_landmarks), ("--deepliif", deepliif),
                                ("--holdout", holdout), ("--downsample", downsample != 1)) if v]
        if given:
            raise click.UsageError(f"a pair split file sets these per row: drop {', '.join(given)}")
        if not stain:
            raise click.UsageError("a pair split file needs --stain (the target stain whose rows to cut)")
        try:
            found, bands = table_pairs(source, stain)
            for p in found:
                if p.registration is not None:
                    r = p.registration
                    click.echo(f"{p.name}: registered by {r.method}"
                               + (f" (landmark residual {r.error_px:.1f} px)" if r.method == "landmarks" else f" (NCC {r.ncc:.3f})"))
            info = write_pair_folders(found, out, size, stride, test_stride, min_tissue, bands, dihedral)
        except SynthgenError as e:
            raise click.ClickException(str(e)) from e
        click.echo(f"{info['counts']['train']} training and {info['counts']['test']} test pairs of {len(found)} "
                   f"image pairs -> {out}")
        return
    if stain:
        raise click.UsageError("--stain goes with a pair split file (.csv) as SOURCE")
    if deepliif:
        if target is not None:
            raise click.UsageError("--deepliif takes one strip (SOURCE) and no TARGET")
        pair = deepliif_pair(source)
    else:
        if target is None:
            raise click.UsageError("TARGET is required (the second stain's section), or pass --deepliif")
        pair = register_sections(source, target, source_landmarks, target_landmarks)
        reg = pair.registration
        click.echo(f"registered {target.name} onto {source.name} by {reg.method}"
                   + (f" (landmark residual {reg.error_px:.1f} px)" if reg.method == "landmarks" else f" (NCC {reg.ncc:.3f})"))
    info = write_pair_folders([downsample_pair(pair, downsample)], out, size, stride, test_stride, min_tissue, holdout, dihedral)
    click.echo(f"{info['counts']['train']} training and {info['counts']['test']} test pairs -> {out}")


@click.command("add-stain")
@click.argument("pipeline", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--to", "stain", required=True, help="The stain these models make, e.g. panck.")
@click.option("--translator", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="OUTPUT_DIR/model of a `task: translator` run trained for this stain.")
@click.option("--lora", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="OUTPUT_DIR/model of a LoRA denoiser run (lora.rank > 0) on this pipeline's denoiser.")
@click.option("--transformer", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A fully fine-tuned IHC denoiser instead of --lora, or a spatial translator (task: "
                   "stain_denoiser), with or without --lora (then the stain has both routes).")
@click.option("--vae", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="OUTPUT_DIR/model of a decoder fine-tune on this stain (`model.freeze_encoder: true`).")
@click.option("--overwrite", is_flag=True, help="Replace the stain if the pipeline has it already.")
def add_stain(pipeline, stain, translator, lora, transformer, vae, overwrite):
    """Install a trained virtual stain into PIPELINE (as stains/<stain>/), for `synthgen stain`.

    \b
      synthgen add-stain checkpoints/my-pipeline --to panck --translator runs/panck/translator/model \\
          --lora runs/panck/denoiser/model --vae runs/panck/vae_decoder/model
    """
    from synthgen.pipelines.stain import install_stain

    dest = install_stain(pipeline, stain, translator, lora=lora, transformer=transformer, vae=vae, overwrite=overwrite)
    click.echo(f"virtual {dest.name} -> {dest}")
