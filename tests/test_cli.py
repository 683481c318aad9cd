import csv
import subprocess
import sys

import pytest

from synthgen.cli import main


def run(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_help_explains_every_option(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "tile" in out and "cache" in out
    code, out, _ = run(["tile", "--help"], capsys)
    for opt in ("--mpp", "--size", "--overlap", "--min-tissue", "--slide-mpp", "--keep-names", "--skip-errors", "--preview"):
        assert opt in out
    code, out, _ = run(["cache", "--help"], capsys)
    assert "--encoder" in out and "NAME=SPEC" in out and "MODULE:FACTORY" in out


def test_tile_writes_table_without_names(tcga, cmu, tmp_path, capsys):
    out_csv = tmp_path / "tiles.csv"
    code, out, err = run(["tile", str(cmu), "--mpp", "1.0", "--size", "128", "-o", str(out_csv),
                          "--preview", str(tmp_path / "prev")], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 29
    assert set(rows[0]) == {"slide_key", "x", "y", "mpp", "size", "tissue_fraction"}
    assert "CMU" not in out_csv.read_text()
    assert len(list((tmp_path / "prev").glob("*.png"))) == 1
    # a barcode-named slide with its mpp override: the barcode stays out of the table
    code, _, err = run(["tile", str(tcga), "--mpp", "1.0", "--size", "128", "--slide-mpp", "0.25",
                        "-o", str(tmp_path / "tcga.csv")], capsys)
    assert code == 0, err
    assert "TCGA" not in (tmp_path / "tcga.csv").read_text()


def test_tile_errors_are_clear(tcga, cmu, tmp_path, capsys):
    code, _, err = run(["tile", str(tcga), "-o", str(tmp_path / "t.csv")], capsys)
    assert code == 1 and "TCGA-CR-7395-01A-01-TS1.svs: no resolution" in err and "--slide-mpp" in err
    code, _, err = run(["tile", str(tmp_path / "missing.svs")], capsys)
    assert code == 1 and "missing.svs: no such file" in err
    code, _, err = run(["tile", str(cmu), "--overlap", "300", "--size", "256"], capsys)
    assert code == 2 and "overlap" in err
    code, _, err = run(["tile", str(cmu), "--mpp", "-1"], capsys)
    assert code == 2 and "--mpp" in err
    # --skip-errors: the good slide is tiled, the bad one reported, exit status 1
    code, out, err = run(["tile", str(tcga), str(cmu), "--mpp", "1.0", "--size", "128", "--skip-errors",
                          "-o", str(tmp_path / "both.csv")], capsys)
    assert code == 1 and "skipped" in err and "29 tiles from 1 slide" in out
    assert (tmp_path / "both.csv").exists()


def test_cache_cli_errors(cmu, tmp_path, capsys):
    code, _, err = run(["tile", str(cmu), "--mpp", "2.0", "--size", "64", "-o", str(tmp_path / "t.csv")], capsys)
    assert code == 0
    code, _, err = run(["cache", str(tmp_path / "t.csv"), "-o", str(tmp_path / "c"), "-e", "nonsense"], capsys)
    assert code == 2 and "expected NAME=SPEC" in err
    code, _, err = run(["cache", str(tmp_path / "t.csv"), "-o", str(tmp_path / "c"), "-e", "x=no_such_mod:f"], capsys)
    assert code == 2 and "cannot import" in err


def test_import_is_light():
    """`import synthgen` loads none of the heavy libraries; they load on first use."""
    code = ("import sys, synthgen; "
            "print([m for m in ('torch', 'diffusers', 'openslide', 'transformers') if m in sys.modules]); "
            "print(synthgen.Slide.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "Slide"]
