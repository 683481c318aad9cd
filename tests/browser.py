"""Drive pages in headless Chromium (Debian's `chromium` package) and read what a person would see.

``probe`` loads a page (with a URL fragment), optionally performs an action in it (e.g. picks a
class in a select, as a click would), waits, and returns measurements taken inside the page:
images loaded / broken, visible cards, the page's width against the window's, the status line.
``screenshot`` saves what the window shows and returns its pixels.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not found (Debian: apt-get install "
                                                            "chromium; .ci/run installs it)")
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
          "--allow-file-access-from-files", "--disable-dev-shm-usage"]

_PROBE = """
<script>
window.addEventListener('load', () => setTimeout(() => {
  %(action)s
  setTimeout(() => {
    const imgs = [...document.querySelectorAll('img')].filter((i) => getComputedStyle(i).display !== 'none');
    const cards = [...document.querySelectorAll('.card')];
    const out = {
      images: imgs.length,
      loaded: imgs.filter((i) => i.complete && i.naturalWidth > 0).length,
      broken: imgs.filter((i) => i.complete && i.naturalWidth === 0).length,
      cards: cards.length,
      card_classes: cards.map((c) => c.querySelector('.meta').textContent),
      overlays_shown: [...document.querySelectorAll('img.overlay')].filter(
        (i) => getComputedStyle(i).display !== 'none').length,
      scroll_width: document.documentElement.scrollWidth, window_width: window.innerWidth,
      status: (document.getElementById('status') || {}).textContent || '',
      hash: location.hash,
    };
    const pre = document.createElement('pre'); pre.id = 'probe-result';
    pre.textContent = JSON.stringify(out); document.body.append(pre);
  }, 400);
}, 100));
</script>
"""


def _run(args: list[str], timeout: float = 90) -> str:
    r = subprocess.run([CHROMIUM, *_FLAGS, *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"chromium failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


def probe(page: Path, fragment: str = "", action: str = "", size: tuple[int, int] = (1280, 2400)) -> dict:
    """Measurements of ``page`` (loaded with ``#fragment``), after ``action`` (JavaScript) ran."""
    copy = page.with_name(f"_probe_{page.name}")  # beside the page: the same relative links
    copy.write_text(page.read_text().replace("</body>", _PROBE % {"action": action} + "</body>"))
    try:
        dom = _run([f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=8000", "--dump-dom",
                    copy.as_uri() + (f"#{fragment}" if fragment else "")])
    finally:
        copy.unlink()
    m = re.search(r'<pre id="probe-result">(.*?)</pre>', dom, re.S)
    assert m, "the page did not finish loading (no probe result in the DOM)"
    import html

    return json.loads(html.unescape(m.group(1)))


def screenshot(page: Path, path: Path, fragment: str = "", size: tuple[int, int] = (1280, 1600)) -> np.ndarray:
    """Save a screenshot of ``page`` at ``size`` to ``path``; returns its RGB pixels."""
    _run([f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=8000", f"--screenshot={path}",
          page.as_uri() + (f"#{fragment}" if fragment else "")])
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def tissue_fraction(pixels: np.ndarray) -> float:
    """Share of pixels coloured like H&E tissue (pink/purple: red and blue above green)."""
    p = pixels.astype(int)
    r, g, b = p[..., 0], p[..., 1], p[..., 2]
    return float(((r - g > 25) & (b - g > 10)).mean())
