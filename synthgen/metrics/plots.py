"""Small PNG charts drawn with Pillow alone (no matplotlib): grouped bars with intervals,
histograms with a threshold line, and captioned image grids, for the evaluation report."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
INK, GRID = (40, 40, 40), (225, 225, 225)


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2 or 5 x 10^k)."""
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 10) for i in range(first, last + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


class _Axes:
    """Plot area with a y axis (and optional x range) inside a white canvas."""

    def __init__(self, width: int, height: int, title: str, ylabel: str, ylo: float, yhi: float,
                 xlabel: str = "", legend: Sequence[str] = ()):
        self.img = Image.new("RGB", (width, height), "white")
        self.draw = ImageDraw.Draw(self.img)
        self.font, self.small = _font(14), _font(12)
        self.ticks = nice_ticks(ylo, yhi)
        self.ylo, self.yhi = self.ticks[0], self.ticks[-1]
        tick_w = max(_text_size(self.draw, _fmt(t), self.small)[0] for t in self.ticks)
        legend_h = 22 * math.ceil(len(legend) / 4) if legend else 0
        self.left, self.top = 28 + tick_w + 10, 34 + legend_h
        self.right, self.bottom = width - 16, height - (62 if xlabel else 48)
        self.draw.text((width // 2, 8), title, fill=INK, font=self.font, anchor="mt")
        for i, name in enumerate(legend):
            x, y = self.left + (i % 4) * ((self.right - self.left) // 4), 30 + 22 * (i // 4)
            self.draw.rectangle([x, y + 2, x + 12, y + 14], fill=PALETTE[i % len(PALETTE)])
            self.draw.text((x + 18, y), name, fill=INK, font=self.small)
        for t in self.ticks:
            y = self.y(t)
            self.draw.line([self.left, y, self.right, y], fill=GRID)
            self.draw.text((self.left - 6, y), _fmt(t), fill=INK, font=self.small, anchor="rm")
        self.draw.line([self.left, self.top, self.left, self.bottom], fill=INK)
        self.draw.line([self.left, self.bottom, self.right, self.bottom], fill=INK)
        if ylabel:  # rotated label on the left
            w, h = _text_size(self.draw, ylabel, self.small)
            lab = Image.new("RGB", (w + 4, h + 6), "white")
            ImageDraw.Draw(lab).text((2, 0), ylabel, fill=INK, font=self.small)
            lab = lab.rotate(90, expand=True)
            self.img.paste(lab, (4, (self.top + self.bottom) // 2 - lab.height // 2))
        if xlabel:
            self.draw.text(((self.left + self.right) // 2, height - 8), xlabel, fill=INK, font=self.small, anchor="mb")

    def y(self, v: float) -> float:
        v = min(max(v, self.ylo), self.yhi)
        return self.bottom - (v - self.ylo) / (self.yhi - self.ylo) * (self.bottom - self.top)


def bar_chart(groups: Sequence[str], series: dict[str, Sequence[float]],
              intervals: dict[str, Sequence[tuple[float, float]]] | None = None, title: str = "",
              ylabel: str = "", ymin: float | None = None, ymax: float | None = None, show_values: bool = False,
              size: tuple[int, int] = (760, 420)) -> Image.Image:
    """Grouped bars: one group per entry of ``groups``, one bar per series in each group, with
    optional (low, high) interval whiskers (clipped to the axis) and value labels. NaN values
    are drawn as an empty slot marked n/a."""
    intervals = intervals or {}
    vals = [v for s in series.values() for v in s if np.isfinite(v)]
    vals += [b for iv in intervals.values() for lo_hi in iv for b in lo_hi if np.isfinite(b)]
    top = ymax if ymax is not None else max([1e-9, *vals]) * 1.05
    bottom = ymin if ymin is not None else min([0.0, *vals])
    ax = _Axes(*size, title, ylabel, bottom, top, legend=list(series) if len(series) > 1 else ())
    d = ax.draw
    n_groups, n_series = max(1, len(groups)), max(1, len(series))
    slot = (ax.right - ax.left) / n_groups
    bar_w = slot * 0.8 / n_series
    zero = ax.y(0.0)
    for gi, group in enumerate(groups):
        x0 = ax.left + gi * slot + slot * 0.1
        for si, (name, row) in enumerate(series.items()):
            v = row[gi]
            bx = x0 + si * bar_w
            if not np.isfinite(v):
                d.text((bx + bar_w / 2, zero - 4), "n/a", fill=INK, font=ax.small, anchor="mb")
                continue
            d.rectangle([bx + 1, min(ax.y(v), zero), bx + bar_w - 1, max(ax.y(v), zero)],
                        fill=PALETTE[si % len(PALETTE)])
            if show_values:
                d.text((bx + bar_w / 2, ax.y(v) - 3), _fmt(v), fill=INK, font=ax.small, anchor="mb")
            iv = intervals.get(name)
            if iv is not None and all(np.isfinite(iv[gi])):
                lo, hi = iv[gi]
                cx = bx + bar_w / 2
                d.line([cx, ax.y(lo), cx, ax.y(hi)], fill=INK, width=2)
                for yy in (ax.y(lo), ax.y(hi)):
                    d.line([cx - bar_w / 4, yy, cx + bar_w / 4, yy], fill=INK, width=2)
        d.text((ax.left + (gi + 0.5) * slot, ax.bottom + 6), group, fill=INK, font=ax.small, anchor="mt")
    return ax.img


def histogram(series: dict[str, Sequence[float]], bins: int = 30, threshold: float | None = None,
              title: str = "", xlabel: str = "", size: tuple[int, int] = (760, 420)) -> Image.Image:
    """Histogram(s) on shared bins (series side by side within a bin), with an optional dashed
    vertical line at ``threshold``."""
    allv = np.concatenate([np.asarray(v, dtype=float) for v in series.values()] or [np.zeros(0)])
    allv = allv[np.isfinite(allv)]
    lo = min(0.0, float(allv.min())) if len(allv) else 0.0
    hi = max(float(allv.max()) * 1.02 if len(allv) else 1.0, 1.25 * (threshold or 0.0)) + 1e-9
    edges = np.linspace(lo, hi, bins + 1)
    counts = {k: np.histogram(np.asarray(v, dtype=float), edges)[0] for k, v in series.items()}
    cmax = max([1, *(int(c.max()) for c in counts.values() if len(c))])
    ax = _Axes(*size, title, "count", 0, cmax, xlabel=xlabel, legend=list(series) if len(series) > 1 else ())
    d = ax.draw

    def x(v: float) -> float:
        return ax.left + (v - lo) / (hi - lo) * (ax.right - ax.left)

    w = (x(edges[1]) - x(edges[0])) / max(1, len(series))
    for si, c in enumerate(counts.values()):
        for b, n in enumerate(c):
            if n:
                bx = x(edges[b]) + si * w
                d.rectangle([bx, ax.y(n), bx + max(1, w - 1), ax.bottom], fill=PALETTE[si % len(PALETTE)])
    for t in nice_ticks(lo, hi, 6):
        if lo <= t <= hi:
            d.line([x(t), ax.bottom, x(t), ax.bottom + 4], fill=INK)
            d.text((x(t), ax.bottom + 6), _fmt(t), fill=INK, font=ax.small, anchor="mt")
    if threshold is not None:
        tx = x(threshold)
        for y0 in range(int(ax.top), int(ax.bottom), 10):
            d.line([tx, y0, tx, min(y0 + 5, ax.bottom)], fill=PALETTE[3], width=2)
        label = f"threshold {threshold:g}"
        right = tx + 4 + _text_size(d, label, ax.small)[0] < ax.right
        d.text((tx + 4 if right else tx - 4, ax.top), label, fill=PALETTE[3], font=ax.small,
               anchor="la" if right else "ra")
    return ax.img


def image_grid(rows: Sequence[tuple[str, Sequence]], tile: int = 64, pad: int = 2) -> Image.Image:
    """Rows of images with a caption on the left of each row. Images are uint8 (3, H, W)
    tensors/arrays or (H, W, 3) arrays; each is resized to ``tile`` px."""
    font = _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cap_w = max([_text_size(probe, c, font)[0] for c, _ in rows] or [0]) + 12
    ncol = max([len(imgs) for _, imgs in rows] or [1])
    grid = Image.new("RGB", (cap_w + ncol * (tile + pad) + pad, len(rows) * (tile + pad) + pad), "white")
    d = ImageDraw.Draw(grid)
    for r, (caption, imgs) in enumerate(rows):
        y = pad + r * (tile + pad)
        d.text((6, y + tile // 2), caption, fill=INK, font=font, anchor="lm")
        for c, im in enumerate(imgs):
            a = np.asarray(im.cpu() if hasattr(im, "cpu") else im)
            if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
                a = a.transpose(1, 2, 0)
            pil = Image.fromarray(np.ascontiguousarray(a.astype(np.uint8)).squeeze()).convert("RGB")
            grid.paste(pil.resize((tile, tile), Image.BILINEAR), (cap_w + pad + c * (tile + pad), y))
    return grid
