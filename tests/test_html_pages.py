"""report.html and the `synthgen view` gallery: what they contain, and what a browser shows.

The browser tests drive headless Chromium (skipped with the reason where it is absent; CI
installs it) and save their screenshots under the test's tmp folder.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from browser import needs_browser, probe, screenshot, tissue_fraction
from cli_helpers import run_cli
from conftest import SMALL
from tiny_encoders import color_tokens

from synthgen.data.datasets import ImageListDataset
from synthgen.errors import SynthgenError
from synthgen.export.gallery import write_gallery
from synthgen.metrics.report import write_report


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Real `synthgen generate` outputs of the shipped pipeline: mask-guided pairs (procedural
    masks) and filtered TUMOR images from the prior (accepted and rejected ones)."""
    root = tmp_path_factory.mktemp("gen")
    run_cli(["masks", "procedural", "-o", str(root / "masks"), "-n", "6", "--size", "64"])
    run_cli(["generate", str(SMALL), "-o", str(root / "paired"), "-n", "6", "--masks", str(root / "masks"),
             "--steps", "2"])
    run_cli(["generate", str(SMALL), "-o", str(root / "rare"), "-n", "12", "--mode", "prior", "--class", "TUMOR",
             "--filter", "--steps", "2"])
    return root


@pytest.fixture(scope="module")
def report(kather, data_dir, generated, tmp_path_factory):
    """A report of two labelled Kather sets (per-class sections), with the audit and mask overlays."""
    real = ImageListDataset.from_folder(kather, size=64)
    synth = ImageListDataset.from_folder(data_dir / "classes" / "kather2016_224", size=64)
    from synthgen.workflows.datasets import mask_pairs as _mask_pairs

    out = tmp_path_factory.mktemp("report")
    rep = write_report(out, real, synth, color_tokens(), audit_train=real, k=2, n_bootstrap=5,
                       mask_pairs=_mask_pairs(generated / "paired"))
    return out, rep, real, synth


def test_report_html_is_self_contained_with_every_part(report):
    out, rep, real, synth = report
    text = (out / "report.html").read_text()
    assert "report.html" in rep["files"]
    assert not re.search(r"(src|href)=\"(?!data:)", text)  # no file or network links: images are inlined
    n_figures = len(re.findall(r"!\[", (out / "report.md").read_text()))
    assert text.count('<img class="figure"') == n_figures
    for part in ("Fidelity", "Privacy: memorisation audit", "Mask adherence", "Per class", "01_TUMOR", "08_EMPTY"):
        assert part in text, part
    assert "|---" not in text and "<table>" in text
    # one section per class, each with its real-vs-synthetic grid
    assert set(re.findall(r'<h3 id="[^"]+">([^<]+)</h3>', text)) == set(real.classes)
    assert len(list(out.glob("samples_class_*.png"))) == len(real.classes)
    # the audit's closest pairs: the smallest ratios, with a valid nearest training item
    closest = rep["sections"]["privacy"]["closest"]
    audit = rep["sections"]["privacy"]
    ratio = np.minimum(audit["ratio"], audit["pixel_ratio"])
    assert [c["synthetic"] for c in closest] == np.argsort(ratio, kind="stable")[:8].tolist()
    assert all(0 <= c["training"] < len(real) for c in closest)
    assert (out / "privacy_closest.png").exists() and (out / "mask_overlays.png").exists()


def test_gallery_records_and_errors(generated, tmp_path):
    r = write_gallery(generated / "rare", tmp_path / "rare.html", progress=False)
    assert r["items"] == 12 and r["classes"] == ["TUMOR"]
    man = json.loads((generated / "rare" / "manifest.json").read_text())
    accepted = sum(it["accepted"] is True for it in man["items"])
    assert r["statuses"]["accepted"] == accepted and r["statuses"]["rejected"] == 12 - accepted
    r = write_gallery(generated / "paired", tmp_path / "sub" / "paired.html", progress=False)
    assert r["overlays"] == 6 and len(list((tmp_path / "sub" / "paired_files").glob("*.png"))) == 6
    page = (tmp_path / "sub" / "paired.html").read_text()
    data = json.loads(re.search(r'<script id="items" type="application/json">(.*?)</script>', page, re.S).group(1))
    for rec in data["items"]:  # links relative to the page's folder reach the dataset's files
        assert (tmp_path / "sub" / rec["file"]).is_file() and (tmp_path / "sub" / rec["overlay"]).is_file()

    with pytest.raises(SynthgenError, match="no manifest.json"):
        write_gallery(tmp_path, tmp_path / "x.html")
    with pytest.raises(SynthgenError, match=r"\.html"):
        write_gallery(generated / "rare", tmp_path / "x.png")
    broken = tmp_path / "broken"
    shutil.copytree(generated / "rare", broken)
    (broken / "images" / "0000003.png").unlink()
    with pytest.raises(SynthgenError, match="1 file.* missing, e.g. images/0000003.png"):
        write_gallery(broken, tmp_path / "b.html")
    assert not (tmp_path / "b.html").exists()
    export = tmp_path / "export"
    run_cli(["export", str(generated / "rare"), "-o", str(export)])
    with pytest.raises(SynthgenError, match="inside the export"):
        write_gallery(export, export / "page.html")
    r = write_gallery(export, tmp_path / "export.html", progress=False)
    assert r["classes"] == ["class_7"] and r["items"] == 12  # the export's class folder (TUMOR is id 7)


def test_view_cli(generated, tmp_path, capsys):
    run_cli(["view", str(generated / "paired"), "-o", str(tmp_path / "p.html")])
    assert "6 items (1 class(es); unfiltered 6; 6 mask overlays)" in capsys.readouterr().out
    from synthgen.cli import main

    with pytest.raises(SystemExit) as e:
        main(["view", str(tmp_path), "-o", str(tmp_path / "q.html")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "no manifest.json" in err and "Traceback" not in err


# -- in a browser ----------------------------------------------------------------------------------

@needs_browser
def test_report_in_browser_desktop_and_phone(report, tmp_path):
    out, *_ = report
    page = out / "report.html"
    seen = probe(page)
    n_figures = len(re.findall(r"!\[", (out / "report.md").read_text()))
    assert seen["images"] == n_figures and seen["loaded"] == n_figures and seen["broken"] == 0
    assert seen["scroll_width"] <= seen["window_width"]
    phone = probe(page, size=(390, 2400))
    assert phone["loaded"] == n_figures and phone["scroll_width"] <= phone["window_width"]  # tables scroll inside
    for name, size in (("desktop", (1280, 1600)), ("phone", (390, 1600))):
        pixels = screenshot(page, tmp_path / f"report_{name}.png", size=size)
        assert pixels.std() > 20, f"{name} screenshot is blank"
        assert tissue_fraction(pixels) > 0.02, f"{name}: no tissue images visible"


@needs_browser
def test_gallery_in_browser_filters_and_overlays(generated, tmp_path):
    page = tmp_path / "rare.html"
    write_gallery(generated / "rare", page, progress=False)
    man = json.loads((generated / "rare" / "manifest.json").read_text())
    accepted = sum(it["accepted"] is True for it in man["items"])
    seen = probe(page)
    assert seen["cards"] == 12 and seen["loaded"] == 12 and seen["broken"] == 0
    assert "Showing 1–12 of 12" in seen["status"] and "12 images loaded, 0 failed" in seen["status"]
    # picking a verdict in the select (as a person would) filters the grid and lands in the URL
    pick = ("const s = document.getElementById('verdict'); s.value = 'rejected';"
            "s.dispatchEvent(new Event('change'));")
    seen = probe(page, action=pick)
    assert seen["cards"] == 12 - accepted and all("rejected" in c for c in seen["card_classes"])
    assert seen["hash"] == "#status=rejected"
    assert probe(page, fragment="status=accepted")["cards"] == accepted
    pixels = screenshot(page, tmp_path / "gallery_rare.png")
    assert pixels.std() > 20 and tissue_fraction(pixels) > 0.02

    paired = tmp_path / "paired.html"
    write_gallery(generated / "paired", paired, progress=False)
    assert probe(paired)["overlays_shown"] == 0
    on = probe(paired, action="const c = document.getElementById('masks'); c.checked = true;"
                               "c.dispatchEvent(new Event('change'));")
    assert on["overlays_shown"] == 6 and on["loaded"] == 12 and on["broken"] == 0  # 6 images + 6 overlays
    screenshot(paired, tmp_path / "gallery_paired_masks.png", fragment="masks=1")


@needs_browser
def test_gallery_pages_through_10000_items(generated, tmp_path):
    """10,000 items (the 12 generated images, listed again and again): one page at a time."""
    big = tmp_path / "big"
    shutil.copytree(generated / "rare", big)
    man = json.loads((big / "manifest.json").read_text())
    items = man["items"]
    man["items"] = [dict(items[i % len(items)], index=i, label=i % 3) for i in range(10_000)]
    (big / "manifest.json").write_text(json.dumps(man))
    page = tmp_path / "big.html"
    r = write_gallery(big, page, page_size=120, progress=False)
    assert r["items"] == 10_000 and len(r["classes"]) == 3
    first = probe(page)
    assert first["cards"] == 120 and first["broken"] == 0 and "of 10000" in first["status"]
    last = probe(page, fragment="page=84")
    assert last["cards"] == 10_000 - 83 * 120 and "Showing 9961–10000" in last["status"]
    one_class = probe(page, fragment="class=class+1&page=2")
    assert one_class["cards"] == 120 and all("class 1" in c for c in one_class["card_classes"])
    # the class select, as a person picks from it: only that class, back on page 1
    pick = ("const s = document.getElementById('class'); s.value = 'class 2';"
            "s.dispatchEvent(new Event('change'));")
    picked = probe(page, fragment="page=3", action=pick)
    assert picked["hash"] == "#class=class+2" and "of 3333" in picked["status"]
    assert picked["cards"] == 120 and all("class 2" in c for c in picked["card_classes"])
