"""The benchmark runner's table and BENCHMARKS.md section, on a real (small) benchmark result."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import run_all  # noqa: E402


@pytest.fixture(scope="module")
def vae_run(data_dir):
    """The VAE-reconstruction benchmark on 8 held-out tiles, in its own process as the runner does."""
    r = run_all.run_benchmark("vae_reconstruction", quick=True, limit=8)
    assert r["error"] is None, r["error"]
    return r


def test_runner_result_has_ratios_and_peak_memory(vae_run):
    res = vae_run["result"]
    assert res["tiles"] == 8 and [row["measure"].split(",")[0] for row in res["summary"]] == [
        "reconstruction PSNR (dB)", "reconstruction SSIM", "reconstruction sharpness"]
    for row in res["summary"]:
        assert row["ratio"] == pytest.approx(row["synthgen_value"] / row["reference_value"])
    psnr, ssim, sharp = res["summary"]
    assert psnr["ratio"] > 1 and ssim["ratio"] > 1  # the trained VAE beats bicubic down/up-sampling
    assert 0.5 < sharp["ratio"] < 1.5 and res["references"]["Gaussian blur sigma 1 px"]["sharpness_ratio"] < 0.3
    assert vae_run["peak_rss_mb"] > 50 and vae_run["seconds"] > 0


def test_summary_table_and_section_added_first(vae_run, tmp_path):
    failed = {"name": "sampling", "result": None, "error": "Traceback ...\nRuntimeError: no pipeline", "seconds": 1.0,
              "peak_rss_mb": 300.0, "children_peak_rss_mb": 0.0}
    table = run_all.summary_table([vae_run, failed])
    lines = table.splitlines()
    assert lines[0].startswith("| benchmark | measure |") and len(lines) == 2 + 3 + 1
    assert lines[2].startswith("| vae_reconstruction | reconstruction PSNR") and "x** |" in lines[2]
    assert lines[3].startswith("|  | reconstruction SSIM")
    assert lines[4].startswith("|  | reconstruction sharpness")
    assert "FAILED: RuntimeError: no pipeline" in lines[5]

    m = run_all.machine()
    assert m["cores"] >= 1 and m["torch"] and m["cpu"]
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n\nIntro.\n\n## Older entry, 2026-01-01\n\nold table\n")
    note = run_all.busy(9.0, 8.0, 2)
    assert "machine was shared" in note and run_all.busy(0.1, 0.2, 2) == ""
    run_all.add_section(bench, run_all.section([vae_run], m, "python benchmarks/run_all.py --quick", "2026-11-22",
                                               True, note))
    text = bench.read_text()
    assert text.startswith("# Benchmarks\n\nIntro.\n\n## All benchmarks (`benchmarks/run_all.py`, --quick), 2026-11-22")
    assert text.index("## All benchmarks") < text.index("## Older entry") and text.endswith("old table\n")
    assert "Command: `python benchmarks/run_all.py --quick`" in text and f"Machine: {m['cpu']}" in text
    assert "machine was shared" in text and "| vae_reconstruction |" in text


def test_every_benchmark_ends_with_its_headline_line():
    """Each benchmark script's main() prints `headline: <name> ratio=<number>` last (issue 19)."""
    import ast

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    skip = {"run_all.py"}  # the runner; helpers (the stain benchmark's pix2pix trainer, data) start with _
    checked = 0
    for path in sorted(bench.glob("[!_]*.py")):
        if path.name in skip:
            continue
        tree = ast.parse(path.read_text())
        main = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"), None)
        assert main is not None, f"{path.name}: no main()"
        prints = [n for n in ast.walk(main) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
        last = max(prints, key=lambda n: (n.lineno, n.col_offset))
        assert "headline: " in ast.unparse(last) and "ratio=" in ast.unparse(last), f"{path.name}: {ast.unparse(last)}"
        checked += 1
    assert checked >= 10
