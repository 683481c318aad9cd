"""One evaluation report of a synthetic set: fidelity, utility, privacy audit, mask adherence and
stain scores, written as ``report.md`` + ``report.json`` + PNG plots + a real-vs-synthetic grid, and
as ``report.html``: the same report in one self-contained page (images inlined, no network) to
open in a browser or send to a colleague.

Sections computed here: fidelity (:mod:`synthgen.metrics.fidelity`, needs an encoder), the
encoder-free fidelity (:mod:`synthgen.metrics.handcrafted`: hand-crafted features, always
computed, with the real-vs-real floor and blurred / stain-shifted references of the same run; in
``report.json`` under ``encoder_free``, beside ``sections``) and the memorisation audit
(:mod:`synthgen.metrics.privacy`, needs an encoder and the generating model's training images).
Sections passed in as results: utility (a :func:`~synthgen.studies.utility.utility_study` dict)
and mask adherence / stain scores (any dict, or JSON file, of numbers, nested or flat: rendered
as tables). Every section not
produced is listed in the report with the reason.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from synthgen._io import atomic_write_text
from synthgen.errors import SynthgenError

SECTIONS = ("fidelity", "utility", "privacy", "masks", "stain")
TITLES = {"fidelity": "Fidelity", "utility": "Utility (train on synthetic, test on real)",
          "privacy": "Privacy: memorisation audit", "masks": "Mask adherence", "stain": "Stain scores"}
FREE_TITLE = "Fidelity, encoder-free features"
_PLOTS = ("fidelity_prdc.png", "utility_recall.png", "privacy_nn.png", "privacy_closest.png", "mask_overlays.png")
_CLASS_GRID = "samples_class_{}.png"
_DEFAULT_SKIP = {
    "fidelity": "no encoder given (--encoder SPEC)",
    "utility": "no utility study given (--utility-train, --utility-test and --pipeline, or --utility-json)",
    "privacy": "no training data of the generating model given (--audit-against, with --encoder)",
    "masks": "no mask-adherence results given (--masks FILE.json)",
    "stain": "no stain results given (--stain FILE.json)",
}


def write_report(out: str | os.PathLike, real, synth, encoder: Callable | str | None = None, *,
                 utility: Mapping | str | os.PathLike | None = None, audit_train=None,
                 audit_threshold: float = 0.5, masks: Mapping | str | os.PathLike | None = None,
                 stain: Mapping | str | os.PathLike | None = None, class_names: list[str] | None = None,
                 k: int = 5, n_bootstrap: int = 100, seed: int = 0, n_samples: int = 8,
                 sources: Mapping[str, str] | None = None, skipped: Mapping[str, str] | None = None,
                 encoder_free: bool = True, mask_pairs=None) -> dict:
    """Evaluate ``synth`` against ``real`` and write the report into folder ``out``.

    Args:
        out: output folder (created; files in it are replaced atomically).
        real, synth: datasets of ``{"image": uint8 (3, H, W), "label"?: int}`` items (e.g. from
            ``ImageListDataset`` or ``PatchDataset``); labels in both give per-class results.
        encoder: feature extractor (callable uint8 batch -> (B, ...)) or an encoder spec string;
            None skips fidelity and the privacy audit.
        utility: result of :func:`~synthgen.studies.utility.utility_study` (a ``"classes"`` key
            with class names is used when present), or a JSON file of one.
        audit_train: dataset of the generating model's training images: runs the memorisation
            audit (encoder-space and pixel-space nearest-neighbour ratios) at ``audit_threshold``.
        masks, stain: results of the mask-adherence / stain metrics: a dict of numbers (flat or
            nested) or a JSON file of one; rendered as tables, whatever their keys.
        class_names: names of label ids (default: the real dataset's ``classes``, or ids).
        k, n_bootstrap, seed: fidelity settings (see :func:`~synthgen.metrics.fidelity.fidelity_report`).
        n_samples: images per row of the sample grid.
        sources: descriptions shown in the header (e.g. ``{"real": ..., "synthetic": ..., "encoder": ...}``).
        skipped: reasons to give for sections not produced, instead of the defaults.
        encoder_free: compute the encoder-free FD with its references
            (:func:`~synthgen.metrics.handcrafted.encoder_free_report`, ``seed``); no encoder needed.
        mask_pairs: synthetic images with the masks they were generated from, ``[(image uint8
            (3, H, W), label map (H, W)), ...]``: shown as mask overlays (first 8).

    Returns:
        ``{"sections": {name: results}, "skipped": {name: reason}, "encoder_free": {...}, "files":
        [names], ...}``, also written to ``out/report.json``. The privacy section lists the
        synthetic items nearest to a training item (``closest``: synthetic and training indices),
        and the report shows those pairs side by side, training images included: keep a report
        with an audit where the training data may be seen. ``encoder_free`` is the
        :func:`~synthgen.metrics.handcrafted.encoder_free_report` result, or ``{"skipped": reason}``
        (sets too small, or ``encoder_free=False``).

    Raises:
        SynthgenError: a results file that is not JSON, or an empty image set.
    """
    from synthgen._io import atomic_save_png as save_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if len(real) == 0 or len(synth) == 0:
        raise SynthgenError(f"report: empty image set (real {len(real)}, synthetic {len(synth)})")
    sources = dict(sources or {})
    if isinstance(encoder, str):
        from synthgen.encoders.load import load_encoder

        sources.setdefault("encoder", encoder)
        encoder = load_encoder(encoder)
    names = class_names or getattr(real, "classes", None)
    skip = {**_DEFAULT_SKIP, **(skipped or {})}
    given = {name: _load_results(v, name) for name, v in (("utility", utility), ("masks", masks), ("stain", stain))
             if v is not None}  # read (and check) the given results before the long computations
    if "utility" in given and "arms" not in given["utility"]:
        raise SynthgenError("report: the utility results have no 'arms' (expected a utility_study result)")
    sections: dict[str, dict] = {}
    why: dict[str, str] = {}
    plots: dict[str, list[str]] = {s: [] for s in SECTIONS}

    feats = {}
    if encoder is not None:
        from synthgen.metrics.fidelity import extract_features, fidelity_report

        feats["real"], lr = extract_features(encoder, real)
        feats["synth"], ls = extract_features(encoder, synth)
        try:
            sections["fidelity"] = fidelity_report(feats["real"], feats["synth"], lr, ls, k=k,
                                                   n_bootstrap=n_bootstrap, seed=seed)
        except ValueError as e:  # sets too small for a statistic
            why["fidelity"] = f"could not compute: {e}"
    else:
        why["fidelity"] = skip["fidelity"]
    if encoder_free:
        from synthgen.metrics.handcrafted import encoder_free_report

        try:
            free = encoder_free_report(real, synth, seed=seed)
        except ValueError as e:
            free = {"skipped": f"could not compute: {e}"}
    else:
        free = {"skipped": "turned off (encoder_free=False)"}
    if "fidelity" in sections:
        save_png(_prdc_plot(sections["fidelity"], names), out / "fidelity_prdc.png")
        plots["fidelity"].append("fidelity_prdc.png")

    if "utility" in given:
        sections["utility"] = given["utility"]
        save_png(_utility_plot(sections["utility"], names), out / "utility_recall.png")
        plots["utility"].append("utility_recall.png")
    else:
        why["utility"] = skip["utility"]

    if audit_train is None:
        why["privacy"] = skip["privacy"]
    elif encoder is None:
        why["privacy"] = "the audit needs an encoder (--encoder SPEC)"
    else:
        try:
            sections["privacy"] = _audit(encoder, feats["synth"], synth, audit_train, audit_threshold,
                                         feats["real"] if audit_train is real else None)
        except ValueError as e:
            why["privacy"] = f"could not compute: {e}"
    if "privacy" in sections:
        save_png(_privacy_plot(sections["privacy"]), out / "privacy_nn.png")
        plots["privacy"].append("privacy_nn.png")
        save_png(_closest_grid(sections["privacy"]["closest"], synth, audit_train), out / "privacy_closest.png")
        plots["privacy"].append("privacy_closest.png")

    for name in ("masks", "stain"):
        if name in given:
            sections[name] = given[name]
        else:
            why[name] = skip[name]
    if mask_pairs:
        save_png(_overlay_grid(list(mask_pairs)[:8]), out / "mask_overlays.png")
        plots["masks"].append("mask_overlays.png")

    grid, by_class = _sample_grid(real, synth, n_samples, names, seed)
    save_png(grid, out / "samples.png")
    class_grids = {c: _CLASS_GRID.format(c) for c in by_class}
    for c, rows in by_class.items():  # the overview's own class rows, one grid per class
        save_png(_image_grid(rows), out / class_grids[c])
    files = ["report.md", "report.html", "report.json", "samples.png", *class_grids.values(),
             *(p for s in SECTIONS for p in plots[s])]
    for stale in [*(set(_PLOTS) - set(files)),  # from an earlier report in the same folder
                  *(f.name for f in out.glob(_CLASS_GRID.format("*")) if f.name not in files)]:
        (out / stale).unlink(missing_ok=True)
    result = {"created": datetime.datetime.now().isoformat(timespec="seconds"),
              "n_real": len(real), "n_synthetic": len(synth), "sources": sources, "class_names": names,
              "samples_per_class": bool(by_class), "sections": sections, "skipped": why, "encoder_free": free,
              "files": files}
    md = _markdown(result, plots, class_grids)
    atomic_write_text(out / "report.json", json.dumps(result, indent=1, default=_json_default))
    atomic_write_text(out / "report.md", md)
    from synthgen._html import markdown_to_html, page

    atomic_write_text(out / "report.html", page("Synthetic data report", markdown_to_html(md, out)))
    return result


# -- sections ------------------------------------------------------------------------------------

def _audit(encoder, synth_feats, synth, train, threshold, train_feats=None) -> dict:
    from synthgen.metrics.fidelity import extract_features
    from synthgen.metrics.privacy import memorization_audit, nearest_items, thumbnails

    if train_feats is None:
        train_feats, _ = extract_features(encoder, train)

    def thumbs(ds):  # item by item: the sets may mix image sizes
        return torch.cat([thumbnails(ds[i]["image"][None]) for i in range(len(ds))])

    audit = memorization_audit(synth_feats, train_feats, thumbs(synth), thumbs(train), threshold=threshold)
    ratio = np.asarray(audit["ratio"])
    if "pixel_ratio" in audit:
        ratio = np.minimum(ratio, np.asarray(audit["pixel_ratio"]))
    order = np.argsort(ratio, kind="stable")[:8].tolist()
    near = nearest_items(synth_feats[order], train_feats)
    audit["closest"] = [{"synthetic": i, "training": int(j), "ratio": float(ratio[i])}
                        for i, j in zip(order, near.tolist(), strict=True)]
    return audit


def _load_results(given, name: str) -> dict:
    if isinstance(given, Mapping):
        return dict(given)
    path = Path(given)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SynthgenError(f"{path}: cannot read the {name} results as JSON ({e})") from e
    if isinstance(data, list):
        data = {str(i): v for i, v in enumerate(data)}
    if not isinstance(data, dict):
        raise SynthgenError(f"{path}: the {name} results must be a JSON object (got {type(data).__name__})")
    return data


# -- plots ---------------------------------------------------------------------------------------

def _class_name(c, names) -> str:
    i = int(c)
    return str(names[i]) if names and 0 <= i < len(names) else f"class {i}"


def _prdc_plot(fid: dict, names):
    from synthgen.metrics.plots import bar_chart

    metrics = ("precision", "recall", "density", "coverage")
    groups = {"overall": fid["overall"]}
    groups.update({_class_name(c, names): r for c, r in fid.get("per_class", {}).items()})
    series = {g: [r[m]["value"] if m in r else float("nan") for m in metrics] for g, r in groups.items()}
    return bar_chart(metrics, series, title="Precision, recall, density, coverage (synthetic vs real)",
                     ylabel="value (density may exceed 1)", show_values=True)


def _utility_plot(util: dict, names):
    from synthgen.metrics.plots import bar_chart

    names = util.get("classes") or names
    arms = util["arms"]
    n = len(next(iter(arms.values()))["per_class_recall"])
    groups = ["balanced acc."] + [_class_name(c, names) for c in range(n)]
    series, intervals = {}, {}
    for arm, r in arms.items():
        stats = [r["balanced_accuracy"], *r["per_class_recall"]]
        series[arm] = [_nan(s["mean"]) for s in stats]
        intervals[arm] = [tuple(_nan(v) for v in s["ci95"]) for s in stats]
    return bar_chart(groups, series, intervals, title="Per-class recall on held-out real data (95% interval over seeds)",
                     ylabel="recall", ymin=0.0, ymax=1.0)


def _privacy_plot(audit: dict):
    from synthgen.metrics.plots import histogram

    series = {"encoder features": audit["ratio"]}
    if "pixel_ratio" in audit:
        series["pixels (grey thumbnails)"] = audit["pixel_ratio"]
    return histogram(series, threshold=audit["threshold"],
                     title="Nearest training item, per synthetic item",
                     xlabel="distance / median real-to-real nearest-neighbour distance")


def _closest_grid(closest: list[dict], synth, train):
    """The synthetic items nearest to a training item, above their nearest training images."""
    rows = [("synthetic", [synth[c["synthetic"]]["image"] for c in closest]),
            ("nearest training", [train[c["training"]]["image"] for c in closest])]
    return _image_grid(rows)


def _overlay_grid(pairs):
    """Rows: the condition mask, the synthetic image, and the mask's outlines over the image."""
    from skimage.segmentation import find_boundaries

    rows = {"mask": [], "synthetic": [], "overlay": []}
    for image, mask in pairs:
        img = np.asarray(image.cpu() if hasattr(image, "cpu") else image)
        img = img.transpose(1, 2, 0) if img.shape[0] == 3 and img.shape[-1] != 3 else img
        m = np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask)
        if m.shape != img.shape[:2]:
            from PIL import Image

            m = np.asarray(Image.fromarray(m.astype(np.int32)).resize(img.shape[1::-1], Image.NEAREST))
        shown = np.full(img.shape, 255, np.uint8)
        shown[m > 0] = (200, 200, 230)
        edge = find_boundaries(m, mode="inner")
        shown[edge] = (40, 40, 160)
        over = img.copy()
        over[edge] = (0, 255, 0)
        rows["mask"].append(shown)
        rows["synthetic"].append(img)
        rows["overlay"].append(over)
    return _image_grid(list(rows.items()))


def _image_grid(rows):
    """``image_grid`` at the rows' image size (48 to 128 px); images (3, H, W) or (H, W, 3)."""
    from synthgen.metrics.plots import image_grid

    def width(im) -> int:
        a = np.asarray(im.cpu() if hasattr(im, "cpu") else im)
        return a.shape[-1] if a.shape[0] == 3 and a.shape[-1] != 3 else a.shape[1]

    return image_grid(rows, tile=int(np.clip(max(width(r[1][0]) for r in rows if r[1]), 48, 128)))


def _sample_grid(real, synth, n: int, names, seed: int):
    """The sample grid and, when both sets share labels, its rows by class (first 8 classes):
    ``{class: [("real", images), ("synthetic", images)]}`` (empty without shared labels)."""
    g = torch.Generator().manual_seed(seed)

    def pick(idx: list[int], m: int) -> list:
        order = torch.randperm(len(idx), generator=g)[:m].tolist()
        return [idx[i] for i in order]

    rl, sl = getattr(real, "labels", None), getattr(synth, "labels", None)
    rows, by_class = [], {}
    if rl is not None and sl is not None and set(rl) & set(sl):
        for c in sorted(set(rl) & set(sl))[:8]:
            by_class[c] = [("real", [real[i]["image"] for i in pick([i for i, v in enumerate(rl) if v == c], n)]),
                           ("synthetic", [synth[i]["image"] for i in pick([i for i, v in enumerate(sl) if v == c], n)])]
            rows += [(f"{_class_name(c, names)}: {what}", imgs) for what, imgs in by_class[c]]
    else:
        ri, si = pick(list(range(len(real))), 2 * n), pick(list(range(len(synth))), 2 * n)
        for j in range(0, max(len(ri), len(si)), n):
            if ri[j : j + n]:
                rows.append(("real", [real[i]["image"] for i in ri[j : j + n]]))
        for j in range(0, len(si), n):
            rows.append(("synthetic", [synth[i]["image"] for i in si[j : j + n]]))
    return _image_grid(rows), by_class


# -- markdown ------------------------------------------------------------------------------------

def _markdown(r: dict, plots: dict[str, list[str]], class_grids: Mapping[int, str] | None = None) -> str:
    src = r["sources"]
    lines = ["# Synthetic data report", "",
             f"Created {r['created']}. Real set: {r['n_real']} images"
             + (f" ({src['real']})" if src.get("real") else "") + f"; synthetic set: {r['n_synthetic']} images"
             + (f" ({src['synthetic']})" if src.get("synthetic") else "") + "."
             + (f" Feature encoder: `{src['encoder']}`." if src.get("encoder") else ""), "",
             "| section | status |", "|---|---|"]
    free = r.get("encoder_free", {})
    for s in SECTIONS:
        lines.append(f"| {TITLES[s]} | {'included' if s in r['sections'] else 'skipped: ' + r['skipped'][s]} |")
        if s == "fidelity":
            lines.append(f"| {FREE_TITLE} | {'not computed: ' + free['skipped'] if 'skipped' in free else 'included'} |")
    lines += ["", "![real and synthetic samples](samples.png)", "",
              "Sample grid: random real images above random synthetic ones"
              + (", per class." if r["samples_per_class"] else "."), ""]
    render = {"fidelity": _md_fidelity, "utility": _md_utility, "privacy": _md_privacy}
    for s in SECTIONS:
        lines += [f"## {TITLES[s]}", ""]
        if s not in r["sections"]:
            lines += [f"Skipped: {r['skipped'][s]}.", ""] + [f"![{s}]({p})" for p in plots[s]] + ([""] if plots[s] else [])
            if s == "fidelity":
                lines += _md_encoder_free(free)
            continue
        body = render.get(s, _md_generic)(r["sections"][s], r["class_names"])
        lines += body + [""] + [f"![{s}]({p})" for p in plots[s]] + ([""] if plots[s] else [])
        if s == "fidelity":
            lines += _md_encoder_free(free)
    if class_grids:
        lines += _md_per_class(r, class_grids)
    skipped = [s for s in SECTIONS if s not in r["sections"]]
    if skipped:
        lines += ["## Skipped sections", ""] + [f"- {TITLES[s]}: {r['skipped'][s]}" for s in skipped] + [""]
    return "\n".join(lines)


def _md_per_class(r: dict, class_grids: Mapping[int, str]) -> list[str]:
    """One sub-section per class: its fidelity row (when computed) and real-vs-synthetic samples."""
    names = r["class_names"]
    fid = r["sections"].get("fidelity", {}).get("per_class", {})
    lines = ["## Per class", ""]
    for c, grid in class_grids.items():
        name = _class_name(c, names)
        lines += [f"### {name}", ""]
        o = fid.get(c, fid.get(str(c)))
        if o is not None:
            lines += _table(["n real", "n synthetic", "FD", "precision", "recall"],
                            [[str(o["n_real"]), str(o["n_fake"]), _n(o["fd"]["value"]),
                              *(_n(o[m]["value"], 3) if m in o else "n/a" for m in ("precision", "recall"))]]) + [""]
        lines += [f"![{name}: real and synthetic samples]({grid})", "",
                  f"Random real {name} images above random synthetic ones.", ""]
    return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]


def _n(v, digits: int = 4) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        return str(v)
    v = float(v)
    return "n/a" if not math.isfinite(v) else f"{v:.{digits}g}"


def _ci(s: dict) -> str:
    return f"{_n(s['mean'], 3)} [{_n(s['ci95'][0], 3)}, {_n(s['ci95'][1], 3)}]"


def _md_fidelity(fid: dict, names) -> list[str]:
    def row(label, o):
        fd = o["fd"]
        return [label, str(o["n_real"]), str(o["n_fake"]), f"{_n(fd['value'])} [{_n(fd['ci95'][0])}, {_n(fd['ci95'][1])}]",
                f"{_n(o['kid']['value'])} ± {_n(o['kid']['std'], 2)}",
                *(_n(o[m]["value"], 3) if m in o else "n/a" for m in ("precision", "recall", "density", "coverage"))]

    rows = [row("overall", fid["overall"])]
    rows += [row(_class_name(c, names), o) for c, o in fid.get("per_class", {}).items()]
    return (_table(["set", "n real", "n synthetic", "FD [95% CI]", "KID ± std", "precision", "recall", "density",
                    "coverage"], rows)
            + ["", "FD and KID: lower is closer to the real set. Precision: share of synthetic images inside the "
                   "real manifold (realism); recall and coverage: how much of the real set the synthetic set "
                   "covers (diversity); density near 1 for matching sets."
               + ("" if "per_class" in fid else " Per-class rows need labels in both sets.")])


def _md_encoder_free(free: dict) -> list[str]:
    """The encoder-free FD table: synthetic, real-vs-real floor, blurred and stain-shifted rows."""
    lines = [f"## {FREE_TITLE}", ""]
    if "skipped" in free:
        return lines + [f"Not computed: {free['skipped']}.", ""]
    from synthgen.metrics.handcrafted import ROWS

    m, floor = free["n_per_half"], free["floor"]["mean"]
    rows = [[label, f"{_n(free[k]['mean'])} ± {_n(free[k]['std'], 2)}",
             f"{free[k]['mean'] / floor:.2f}x" if floor > 0 else "n/a"] for k, label in ROWS]
    return lines + _table(["set vs a random half of the real set", "FD (mean ± std over splits)", "vs floor"], rows) + [
        "", f"{free['n_features']} hand-crafted features per image (stain deconvolution statistics, colour "
        "histograms, LBP and GLCM texture, nuclei density and size, sharpness; no encoder), standardised with the "
        f"real set's mean and std. Every row compares {m} images with a random half of the {free['n_real']} real "
        f"images ({free['n_splits']} random splits), so all rows share the same small-sample bias; the floor is the "
        f"other real half. All {free['n_synthetic']} synthetic vs all real images: FD {_n(free['fd'])}.", ""]


def _md_utility(util: dict, names) -> list[str]:
    names = util.get("classes") or names
    arms = util["arms"]
    n = len(next(iter(arms.values()))["per_class_f1"])
    counts = ", ".join(f"{_class_name(c, names)} {v}" for c, v in util.get("train_counts", {}).items())
    lines = [f"Classifier trained {len(util.get('seeds', []))} times per arm (seeds {util.get('seeds')}, "
             f"{util.get('epochs')} epochs); rare class: {_class_name(util['rare_class'], names)}"
             + (f"; training counts: {counts}" if counts else "") + ". Mean [95% t-interval over seeds; "
             "with few seeds it is wide and may pass 0 or 1].", ""]
    rows = [[arm, _ci(r["balanced_accuracy"]), _ci(r["rare_class_recall"]),
             _n(float(np.nanmean([_nan(f["mean"]) for f in r["per_class_f1"]])), 3)] for arm, r in arms.items()]
    lines += _table(["arm", "balanced accuracy", "rare-class recall", "macro F1"], rows) + [""]
    rows = [[arm] + [_n(_nan(f["mean"]), 3) for f in r["per_class_f1"]] for arm, r in arms.items()]
    lines += ["Per-class F1:", ""] + _table(["arm"] + [_class_name(c, names) for c in range(n)], rows)
    return lines


def _md_privacy(a: dict, names) -> list[str]:
    flagged = int(sum(a["flagged"]))
    rows = [["synthetic items checked", str(a["n_synthetic"])], ["real training items", str(a["n_real"])],
            ["threshold (ratio)", _n(a["threshold"])],
            ["flagged as near-copies", f"{flagged} ({100 * a['flagged_fraction']:.1f}%)"]]
    for key, label in (("ratio", "encoder-feature ratio"), ("pixel_ratio", "pixel ratio")):
        if key in a:
            v = np.asarray(a[key], dtype=float)
            rows.append([f"{label}: min / 5% / median", " / ".join(_n(x, 3) for x in np.quantile(v, [0, 0.05, 0.5]))])
    return (["Each synthetic item's distance to its nearest training item, divided by the median "
             "real-to-real nearest-neighbour distance; under the threshold in either space it is "
             "flagged as a near-copy. The second figure shows the synthetic items nearest to a training item "
             "(by the smaller of the two ratios) above their nearest training images (encoder space): the "
             "pairs to look at before sharing.", ""]
            + _table(["", "value"], rows))


def _md_generic(d: dict, names=None) -> list[str]:
    """Any dict of numbers: scalar leaves as one key/value table (dotted paths), and every group of
    two or more sibling dicts of scalars (per-class metrics, arms, ...) as a row x column table."""
    flat, blocks = [], []

    def walk(prefix: str, v):
        if isinstance(v, Mapping):
            rows = {k: x for k, x in v.items() if isinstance(x, Mapping) and x and all(map(_cell, x.values()))}
            if len(rows) >= 2:
                blocks.append((prefix, rows))
            for key, x in v.items():
                if len(rows) < 2 or key not in rows:
                    walk(f"{prefix}.{key}" if prefix else str(key), x)
        elif isinstance(v, list | tuple):
            if all(_cell(x) and not isinstance(x, str) for x in v):
                flat.append((prefix, _list(v)))
            else:
                walk(prefix, {str(i): x for i, x in enumerate(v)})
        else:
            flat.append((prefix, _n(v)))

    walk("", d)
    lines = _table(["metric", "value"], [[k or "value", v] for k, v in flat]) if flat else []
    for prefix, block in blocks:
        cols = list(dict.fromkeys(c for row in block.values() for c in row))
        lines += ["", f"{prefix or 'by entry'}:", ""]
        lines += _table([""] + [str(c) for c in cols],
                        [[str(key)] + [_list(x) if isinstance(x, list | tuple) else _n(x)
                                       for x in (row.get(c, float("nan")) for c in cols)]
                         for key, row in block.items()])
    return lines or ["(no values)"]


def _cell(v) -> bool:
    """A table cell: a scalar, or a list of numbers."""
    if isinstance(v, list | tuple):
        return all(isinstance(x, int | float) or x is None for x in v)
    return _scalar(v)


def _list(v) -> str:
    vals = [float(x) if x is not None else float("nan") for x in v]
    if len(vals) <= 10:
        return ", ".join(_n(x) for x in vals)
    a = np.asarray(vals)
    return f"n={len(a)}, mean {_n(np.nanmean(a))}, min {_n(np.nanmin(a))}, max {_n(np.nanmax(a))}"


def _scalar(v) -> bool:
    return v is None or isinstance(v, int | float | str | bool)


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, np.generic | np.ndarray):
        return o.tolist()
    return str(o)
