"""A browsable HTML gallery of a generated dataset (``synthgen view``).

The page reads a ``synthgen generate`` output or an ImageFolder export: every item with its
class, filter verdict (accepted / rejected / flagged as a near-copy), seed and condition, and,
for mask-guided pairs, an outline overlay of the condition mask that a checkbox shows or hides.
Images stay where they are (the page links them by relative path, so it works from the file
system; move page and dataset together); the overlays are written once into a folder beside the
page. Paging (``page_size`` images at a time, lazily loaded) keeps 10,000 items fluid. The view's
state (class, verdict, page, overlays) lives in the URL fragment, e.g. ``page.html#class=TUMOR&
status=accepted&page=2``, so a filtered view can be bookmarked or sent.
"""

from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path

import numpy as np

from synthgen._io import atomic_dir, atomic_write_text
from synthgen.errors import SynthgenError

STATUSES = ("accepted", "rejected", "flagged", "unfiltered")

_STYLE = """
main { max-width: none; }
.controls { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center; margin: 8px 0; }
.controls label { white-space: nowrap; }
select, button { font: inherit; padding: 2px 6px; }
#status { color: var(--muted); margin: 4px 0 10px; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(136px, 1fr)); gap: 10px; }
.card { background: white; border: 1px solid var(--line); border-radius: 4px; padding: 4px; font-size: 12px; }
.card.rejected { border-color: #c0392b; } .card.flagged { border-color: #e67e22; border-width: 2px; }
.frame { position: relative; width: 100%; aspect-ratio: 1; background: #eee; }
.frame img { position: absolute; inset: 0; width: 100%; height: 100%; image-rendering: pixelated; }
.frame img.overlay { display: none; }
body.masks .frame img.overlay { display: block; }
.meta { margin-top: 3px; line-height: 1.3; word-break: break-word; }
.tag { display: inline-block; padding: 0 4px; border-radius: 3px; background: #eef0f4; }
.tag.rejected { background: #f6d5d1; } .tag.flagged { background: #fbe1c6; } .tag.accepted { background: #d7efd9; }
details { margin: 6px 0; } pre { white-space: pre-wrap; font-size: 12px; }
"""

_SCRIPT = r"""
const DATA = JSON.parse(document.getElementById('items').textContent);
const PAGE = DATA.page_size;
const $ = (id) => document.getElementById(id);
function state() {
  const p = new URLSearchParams(location.hash.slice(1));
  return {cls: p.get('class') || '', status: p.get('status') || '', page: Math.max(1, parseInt(p.get('page') || '1')),
          masks: p.get('masks') === '1'};
}
function go(s) {
  const p = new URLSearchParams();
  if (s.cls) p.set('class', s.cls);
  if (s.status) p.set('status', s.status);
  if (s.page > 1) p.set('page', s.page);
  if (s.masks) p.set('masks', '1');
  location.hash = p.toString();
}
let loaded = 0, failed = 0;
function counts() { $('loaded').textContent = loaded; $('failed').textContent = failed; }
function render() {
  const s = state();
  $('class').value = s.cls; $('verdict').value = s.status; $('masks').checked = s.masks;
  document.body.classList.toggle('masks', s.masks);
  const shown = DATA.items.filter((it) => (!s.cls || it.class === s.cls) && (!s.status || it.status === s.status));
  const pages = Math.max(1, Math.ceil(shown.length / PAGE));
  const page = Math.min(s.page, pages);
  const part = shown.slice((page - 1) * PAGE, page * PAGE);
  loaded = 0; failed = 0;
  const grid = $('grid');
  grid.replaceChildren();
  for (const it of part) {
    const card = document.createElement('div');
    card.className = 'card ' + it.status;
    card.dataset.index = it.index;
    const frame = document.createElement('div');
    frame.className = 'frame';
    const img = document.createElement('img');
    img.loading = 'lazy'; img.alt = 'item ' + it.index; img.className = 'image';
    img.onload = () => { loaded++; counts(); };
    img.onerror = () => { failed++; counts(); card.classList.add('broken'); };
    img.src = it.file;
    frame.append(img);
    if (it.overlay) {
      const ov = document.createElement('img');
      ov.className = 'overlay'; ov.alt = 'mask of item ' + it.index; ov.src = it.overlay; ov.loading = 'lazy';
      frame.append(ov);
    }
    const meta = document.createElement('div');
    meta.className = 'meta';
    meta.innerHTML = '#' + it.index + ' <span class="tag ' + it.status + '">' + it.status + '</span><br>' +
      escapeHtml(it.class) + '<br>seed ' + it.seed + (it.condition ? ' · ' + escapeHtml(it.condition) : '') +
      (it.extra ? '<br>' + escapeHtml(it.extra) : '');
    card.title = it.details;
    card.append(frame, meta);
    grid.append(card);
  }
  const first = shown.length ? (page - 1) * PAGE + 1 : 0;
  $('range').textContent = first + '–' + ((page - 1) * PAGE + part.length);
  $('shown').textContent = shown.length;
  $('pages').textContent = 'page ' + page + ' of ' + pages;
  $('prev').disabled = page <= 1; $('next').disabled = page >= pages;
  counts();
}
function escapeHtml(t) { const d = document.createElement('span'); d.textContent = String(t); return d.innerHTML; }
for (const c of DATA.classes) { const o = document.createElement('option'); o.value = c; o.textContent = c; $('class').append(o); }
$('class').onchange = () => go({...state(), cls: $('class').value, page: 1});
$('verdict').onchange = () => go({...state(), status: $('verdict').value, page: 1});
$('masks').onchange = () => go({...state(), masks: $('masks').checked});
$('prev').onclick = () => go({...state(), page: state().page - 1});
$('next').onclick = () => go({...state(), page: state().page + 1});
window.addEventListener('hashchange', render);
render();
"""


def write_gallery(dataset: str | os.PathLike, out: str | os.PathLike, *, page_size: int = 120,
                  title: str | None = None, progress: bool = True) -> dict:
    """Write ``out`` (an HTML page) browsing ``dataset``, and the mask overlays beside it.

    Args:
        dataset: a ``synthgen generate`` output or an ImageFolder ``synthgen export`` (a folder
            with ``manifest.json``).
        out: the page to write (``.html``); overlays go to ``<out stem>_files/`` beside it.
        page_size: images per page.
        title: page title (default: the dataset folder's name).

    Returns:
        ``{"page", "items", "classes", "statuses": {status: count}, "overlays"}``.

    Raises:
        SynthgenError: no manifest, an export whose images are inside shards, files listed but
            missing, or an output path inside an export (it would break the export's checksums).
    """
    dataset, out = Path(dataset), Path(out)
    manifest_path = dataset / "manifest.json"
    if not manifest_path.is_file():
        raise SynthgenError(f"{dataset}: no manifest.json (view reads a `synthgen generate` output or an export)")
    try:
        man = json.loads(manifest_path.read_text())
        items = list(man["items"])
    except (ValueError, KeyError, TypeError) as e:
        raise SynthgenError(f"{manifest_path}: not a synthgen manifest ({e})") from e
    fmt = man.get("format")
    if fmt not in (None, "imagefolder"):
        raise SynthgenError(f"{dataset}: a {fmt} export keeps its images inside shards; view the `synthgen generate` "
                            "output it was exported from, or an imagefolder export")
    if fmt == "imagefolder" and out.resolve().is_relative_to(dataset.resolve()):
        raise SynthgenError(f"{out}: inside the export {dataset}; its manifest lists every file, so write the page "
                            "elsewhere")
    if out.suffix.lower() not in (".html", ".htm"):
        raise SynthgenError(f"{out}: the page must be an .html file")
    missing = [it["file"] for it in items if not (dataset / it["file"]).is_file()]
    if missing:
        raise SynthgenError(f"{dataset}: {len(missing)} file(s) listed in manifest.json are missing, e.g. {missing[0]}")

    out.parent.mkdir(parents=True, exist_ok=True)
    assets = out.with_name(out.stem + "_files")
    records = []
    n_overlays = 0
    from tqdm.auto import tqdm

    with atomic_dir(assets) as tmp_assets:  # a page's overlays appear all at once, or not at all
        for it in tqdm(items, desc="gallery", unit="item", disable=not progress):
            rec = _record(it, man, dataset, out.parent)
            if it.get("mask"):
                name = f"{int(it.get('index', len(records))):07d}.png"
                _write_overlay(dataset / it["mask"], tmp_assets / name)
                rec["overlay"] = os.path.relpath(assets / name, out.parent).replace(os.sep, "/")
                n_overlays += 1
            records.append(rec)
    if not n_overlays:  # no masks: no asset folder
        shutil.rmtree(assets)

    classes = sorted({r["class"] for r in records})
    statuses = {s: sum(r["status"] == s for r in records) for s in STATUSES}
    title = title or dataset.resolve().name
    data = {"page_size": int(page_size), "classes": classes, "items": records}
    body = _body(title, man, len(records), classes, statuses, n_overlays)
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    from synthgen._html import page

    text = page(f"{title}: synthgen gallery",
                body + f'\n<script id="items" type="application/json">{blob}</script>', _STYLE, _SCRIPT)
    atomic_write_text(out, text)
    return {"page": str(out), "items": len(records), "classes": classes, "statuses": statuses, "overlays": n_overlays}


def _record(it: dict, man: dict, dataset: Path, page_dir: Path) -> dict:
    label = it.get("label")
    if it.get("class_name"):
        name = str(it["class_name"])
    elif man.get("class_name") and label is not None and label == man.get("class"):
        name = str(man["class_name"])
    elif man.get("format") == "imagefolder":
        name = Path(it["file"]).parts[0]  # the export's class folder
    else:
        name = "unlabelled" if label is None else f"class {label}"
    if it.get("flagged"):
        status = "flagged"
    elif it.get("accepted") is True:
        status = "accepted"
    elif it.get("accepted") is False:
        status = "rejected"
    else:
        status = "unfiltered"
    extra = []
    for key, fmt in (("realism", "realism {:.3g}"), ("nn_ratio", "nn ratio {:.3g}")):
        v = it.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            extra.append(fmt.format(v))
    details = "\n".join(f"{k}: {v}" for k, v in it.items() if not k.endswith("sha256"))
    return {"index": it.get("index"), "file": os.path.relpath(dataset / it["file"], page_dir).replace(os.sep, "/"),
            "class": name, "status": status, "seed": it.get("seed"), "condition": it.get("condition"),
            "extra": ", ".join(extra), "details": details}


def _write_overlay(mask_path: Path, path: Path) -> None:
    """Transparent PNG with the mask's instance outlines in green (drawn over the image)."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    from synthgen.data.masks import read_label_map

    try:
        m = read_label_map(mask_path)
    except Exception as e:  # an unreadable mask is named, not a traceback
        raise SynthgenError(f"{mask_path}: cannot read the mask ({e})") from e
    rgba = np.zeros((*m.shape, 4), np.uint8)
    rgba[m > 0] = (120, 120, 255, 70)
    rgba[find_boundaries(m, mode="inner")] = (0, 255, 0, 255)
    Image.fromarray(rgba, "RGBA").save(path)


def _body(title: str, man: dict, n: int, classes: list[str], statuses: dict, n_overlays: int) -> str:
    e = html.escape
    gen = man.get("generator") if isinstance(man.get("generator"), dict) else man
    facts = [f"{n} items"] + [f"{k.replace('_', ' ')} {e(str(gen[k]))}" for k in
                               ("mode", "class_name", "guidance_scale", "num_inference_steps", "seed", "strength")
                               if gen.get(k) is not None]
    if man.get("format"):
        facts.insert(0, f"{e(man['format'])} export")
    counts = ", ".join(f"{s} {c}" for s, c in statuses.items() if c)
    licence = gen.get("model_licence")
    options = "".join(f'<option value="{s}">{s} ({c})</option>' for s, c in statuses.items() if c)
    return f"""<h1>{e(title)}</h1>
<p>{' · '.join(facts)}. Verdicts: {e(counts)}.</p>
{f'<details><summary>Licence of the generating model</summary><pre>{e(licence)}</pre></details>' if licence else ''}
<div class="controls">
<label>Class <select id="class"><option value="">all ({len(classes)})</option></select></label>
<label>Verdict <select id="verdict"><option value="">all</option>{options}</select></label>
<label{'' if n_overlays else ' hidden'}><input type="checkbox" id="masks"> mask overlays</label>
<button id="prev">&larr; previous</button> <span id="pages"></span> <button id="next">next &rarr;</button>
</div>
<p id="status">Showing <span id="range"></span> of <span id="shown"></span> ·
<span id="loaded">0</span> images loaded, <span id="failed">0</span> failed</p>
<div id="grid"></div>"""
