"""Paired stains: stain names, registration on real sections, aligned patch pairs, paired folders."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synthgen.data.pairs import PairedStainDataset, deepliif_pair, folder_pairs, resolve_stain
from synthgen.data.registration import (
    apply_affine,
    fit_affine,
    landmark_errors,
    matched_landmarks,
    read_landmarks,
    register_intensity,
    register_landmarks,
    tissue_density,
    warp_to,
)
from synthgen.data.slides import Slide
from synthgen.errors import RegistrationError, StainError, SynthgenError


@pytest.fixture(scope="session")
def stains(data_dir) -> Path:
    return data_dir / "stains"


@pytest.fixture(scope="session")
def deepliif(stains):
    """Aligned (hematoxylin, Ki67 IHC) pairs of both DeepLIIF strips."""
    return [deepliif_pair(stains / "deepliif" / f"{name}.png") for name in ("Lung1", "Bladder1")]


def known_affine(shape, rotation_deg=3.0, scale=1.05, shift=(12.0, -8.0)) -> np.ndarray:
    """Rotation about the image centre, isotropic scale and a shift: moving -> fixed, (3, 3)."""
    c = np.array([shape[1] - 1, shape[0] - 1]) / 2
    a = math.radians(rotation_deg)
    R = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = R, c - R @ c + np.asarray(shift)
    return m


def displacement_error(estimate: np.ndarray, truth: np.ndarray, shape) -> float:
    """Largest distance (px) between where the two transforms send a 9x9 grid over the image."""
    h, w = shape[:2]
    g = np.stack(np.meshgrid(np.linspace(0, w - 1, 9), np.linspace(0, h - 1, 9)), -1).reshape(-1, 2)
    return float(np.linalg.norm(apply_affine(estimate, g) - apply_affine(truth, g), axis=1).max())


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def cmu_tile(cmu, size=384) -> np.ndarray:
    with Slide(cmu) as s:
        return s.read(800, 1200, size, 0.5)


# -- stain names ------------------------------------------------------------------------------
def test_resolve_stain_aliases_case_and_punctuation():
    cases = {"H&E": "he", "h and e": "he", "Haematoxylin": "hematoxylin", "Ki-67": "ki67", "MIB-1": "ki67",
             "HER2/neu": "her2", "ERBB2": "her2", "ER": "er", "PgR": "pr", "PanCytokeratin": "panck",
             "pan-CK": "panck", "CD31": "cd31", "cd-3": "cd3", "CD8": "cd8", "TP53": "p53"}
    assert {k: resolve_stain(k) for k in cases} == cases


def test_unknown_stain_lists_the_known_names():
    with pytest.raises(StainError, match="unknown stain 'Ki76'") as e:
        resolve_stain("Ki76")
    assert isinstance(e.value, SynthgenError)
    for name in ("he", "ki67", "her2", "panck", "cd31", "p53"):
        assert name in str(e.value)


# -- landmarks --------------------------------------------------------------------------------
def test_read_anhir_landmarks_and_pair_them_by_id(stains):
    d = stains / "anhir-rat-kidney"
    ids, he = read_landmarks(d / "Rat-Kidney_HE.csv")
    _, ck = read_landmarks(d / "Rat-Kidney_PanCytokeratin.csv")
    assert he.shape == (71, 2) and ck.shape == (69, 2) and ids[:3] == ["1", "2", "3"]
    assert he[0].tolist() == [63.0, 309.0]  # first data row "1,63,309": the index column is not a coordinate
    mxy, fxy = matched_landmarks(d / "Rat-Kidney_PanCytokeratin.csv", d / "Rat-Kidney_HE.csv")
    assert len(mxy) == len(fxy) == 69 and np.array_equal(fxy, he[:69])


def test_landmark_fit_recovers_a_known_affine_on_a_real_tile(cmu, tmp_path):
    """Landmarks at tissue corners of a real H&E tile, moved by a known affine and rounded to whole
    pixels as in ANHIR files: the fit recovers the transform and the warp reproduces the image."""
    from skimage.feature import corner_harris, corner_peaks

    tile = cmu_tile(cmu)
    truth = known_affine(tile.shape)
    pts = corner_peaks(corner_harris(tissue_density(tile)), min_distance=20, num_peaks=40)[:, ::-1].astype(float)
    assert len(pts) >= 20
    moved = np.rint(apply_affine(truth, pts))
    for name, xy in (("moving.csv", pts), ("fixed.csv", moved)):
        (tmp_path / name).write_text(",X,Y\n" + "".join(f"{i + 1},{x:g},{y:g}\n" for i, (x, y) in enumerate(xy)))
    reg = register_landmarks(tmp_path / "moving.csv", tmp_path / "fixed.csv")
    assert reg.method == "landmarks" and reg.error_px < 0.5  # only the rounding is left
    assert displacement_error(reg.matrix, truth, tile.shape) < 0.5
    fixed = warp_to(tile.shape, tile, truth)
    inner = (slice(40, -40), slice(40, -40))
    assert ncc(warp_to(tile.shape, tile, reg.matrix)[inner].astype(float), fixed[inner].astype(float)) > 0.99


def test_affine_fit_refuses_too_few_or_collinear_points():
    with pytest.raises(RegistrationError, match="at least 3"):
        fit_affine(np.zeros((2, 2)), np.zeros((2, 2)))
    line = np.stack([np.arange(5.0), 2 * np.arange(5.0)], 1)
    with pytest.raises(RegistrationError, match="collinear"):
        fit_affine(line, line + 1)


def test_anhir_landmark_fit_has_small_tre_on_held_out_landmarks(stains):
    d = stains / "anhir-rat-kidney"
    mxy, fxy = matched_landmarks(d / "Rat-Kidney_PanCytokeratin.csv", d / "Rat-Kidney_HE.csv")
    held = np.arange(len(mxy)) % 3 == 0  # every third landmark is only used to measure
    m = fit_affine(mxy[~held], fxy[~held])
    tre = landmark_errors(m, mxy[held], fxy[held])
    unregistered = np.linalg.norm(mxy[held] - fxy[held], axis=1)
    # measured: held-out TRE mean 4.9 px, median 3.9 px (sections ~1160 px wide); unregistered 28 px
    assert tre.mean() < 7.0 and np.median(tre) < 5.0
    assert unregistered.mean() > 4 * tre.mean()


# -- intensity registration -------------------------------------------------------------------
def test_intensity_registration_recovers_a_known_affine_on_a_real_tile(cmu):
    tile = cmu_tile(cmu)
    truth = known_affine(tile.shape)
    reg = register_intensity(warp_to(tile.shape, tile, truth), tile)
    assert reg.method == "intensity" and reg.ncc > 0.95
    assert displacement_error(reg.matrix, truth, tile.shape) < 1.0  # measured ~0.15 px


def test_intensity_registration_works_across_stains(deepliif):
    """Known affine between two stains of one field: the hematoxylin-only panel is registered onto
    the warped Ki67 IHC panel (DAB-brown and blue nuclei) through tissue optical density."""
    pair = deepliif[1]  # Bladder1
    src, ihc = pair.source[:384, :384], pair.target[:384, :384]
    truth = known_affine(src.shape)
    reg = register_intensity(warp_to(src.shape, ihc, truth), src)
    # the panels themselves agree to ~0.5 px after alignment; measured error ~1 px
    assert displacement_error(reg.matrix, truth, src.shape) < 2.0


def test_intensity_registration_of_consecutive_sections_matches_the_landmarks(stains):
    """H&E vs PanCytokeratin sections, registered without their landmarks: the landmarks then
    measure it (measured TRE 5.2 px mean, against 4.8 px residual of the landmark fit itself)."""
    d = stains / "anhir-rat-kidney"
    ds = PairedStainDataset.from_sections(d / "Rat-Kidney_HE.jpg", d / "Rat-Kidney_PanCytokeratin.jpg",
                                          target_stain="PanCytokeratin", size=128, min_tissue=0.5)
    reg = ds.pairs[0].registration
    mxy, fxy = matched_landmarks(d / "Rat-Kidney_PanCytokeratin.csv", d / "Rat-Kidney_HE.csv")
    tre = landmark_errors(reg.matrix, mxy, fxy)
    assert reg.method == "intensity" and tre.mean() < 8.0 and np.median(tre) < 6.0
    # patches: inside the warped section, tissue in both, the target really is the IHC section
    assert len(ds) >= 10 and ds.target_stain == "panck"
    item = ds[len(ds) // 2]
    assert item["image"].shape == item["target"].shape == (3, 128, 128) and item["image"].dtype == torch.uint8
    assert item["stain"] == "panck"
    k, x, y = ds.patches[len(ds) // 2]
    assert ds.pairs[k].valid[y : y + 128, x : x + 128].all()


def test_sections_dataset_from_landmarks(stains):
    d = stains / "anhir-rat-kidney"
    ds = PairedStainDataset.from_sections(d / "Rat-Kidney_HE.jpg", d / "Rat-Kidney_PanCytokeratin.jpg", "panck",
                                          source_landmarks=d / "Rat-Kidney_HE.csv",
                                          target_landmarks=d / "Rat-Kidney_PanCytokeratin.csv", size=128, stride=64)
    pair = ds.pairs[0]
    assert pair.registration.method == "landmarks" and 3 < pair.registration.error_px < 6  # measured 4.8 px
    assert pair.target.shape == pair.source.shape  # the IHC section is warped into the H&E frame
    # each kept patch holds tissue (optical density above glass) on both sides
    from synthgen.data.pairs import GLASS_OD
    from synthgen.data.registration import optical_density

    for i in (0, len(ds) // 2, len(ds) - 1):
        item = ds[i]
        for img in (item["image"], item["target"]):
            assert (optical_density(img.permute(1, 2, 0).numpy()) > GLASS_OD).mean() >= 0.5
    with pytest.raises(RegistrationError, match="both"):
        PairedStainDataset.from_sections(d / "Rat-Kidney_HE.jpg", d / "Rat-Kidney_PanCytokeratin.jpg", "panck",
                                         source_landmarks=d / "Rat-Kidney_HE.csv")


def test_registration_refuses_a_blank_image(cmu):
    tile = cmu_tile(cmu, 128)
    with pytest.raises(RegistrationError, match="no contrast"):
        register_intensity(tile, np.full_like(tile, 240))


# -- DeepLIIF pairs ---------------------------------------------------------------------------
def _shift_scores(src_h: np.ndarray, tgt_h: np.ndarray, shifts, m: int = 12) -> dict:
    H, W = src_h.shape
    return {(dx, dy): ncc(src_h[m : H - m, m : W - m], tgt_h[m + dy : H - m + dy, m + dx : W - m + dx])
            for dy in shifts for dx in shifts}


def test_deepliif_dataset_yields_aligned_pairs(stains):
    """The hematoxylin of the source panel lines up with the hematoxylin counterstain of the IHC
    panel at zero shift, better than at any shifted offset. The raw panels do not: the IHC panel
    of the sample strips sits ~7 px off, which deepliif_pair measures and removes."""
    from skimage.color import rgb2hed

    ds = PairedStainDataset.from_deepliif(stains / "deepliif", size=256, stride=128)
    assert ds.target_stain == "ki67" and ds.source_stain == "hematoxylin"
    strips = len(list((stains / "deepliif").glob("*.png")))
    # 3x3 patches fit a 512 px panel; a strip whose IHC panel sits off by a few px is cropped to the
    # overlap (~505 px for Lung1 and Bladder1), which leaves 2x2
    assert strips >= 2 and 4 * strips <= len(ds) <= 9 * strips and len(ds) < 9 * strips
    shifts = range(-8, 9, 2)
    for i in (0, len(ds) - 1):
        item = ds[i]
        h_src = rgb2hed(item["image"].permute(1, 2, 0).numpy())[..., 0]
        h_tgt = rgb2hed(item["target"].permute(1, 2, 0).numpy())[..., 0]
        scores = _shift_scores(h_src, h_tgt, shifts)
        assert max(scores, key=scores.get) == (0, 0)
        assert scores[(0, 0)] > 0.75
        assert scores[(0, 0)] - max(v for k, v in scores.items() if max(map(abs, k)) >= 6) > 0.1
    raw = deepliif_pair(stains / "deepliif" / "Lung1.png", align=False)
    scores = _shift_scores(rgb2hed(raw.source)[..., 0], rgb2hed(raw.target)[..., 0], shifts)
    assert max(scores, key=scores.get) != (0, 0)
    shift = ds.pairs[0].registration  # Lung1: measured (dx, dy) ~ (-0.5, +6.9) before the crop
    assert shift.method == "translation" and shift.ncc > 0.8


def test_deepliif_strip_must_be_six_square_panels(tmp_path):
    Image.new("RGB", (600, 200), "white").save(tmp_path / "strip.png")
    with pytest.raises(StainError, match="six square panels.*600x200"):
        deepliif_pair(tmp_path / "strip.png")


# -- paired folders ---------------------------------------------------------------------------
def _write_pairs(deepliif, a_dir: Path, b_dir: Path, names=("case_a", "case_b", "case_c"), size=64):
    """Real crops: the hematoxylin panel on side A, the IHC panel of the same place on side B."""
    a_dir.mkdir(parents=True)
    b_dir.mkdir(parents=True)
    crops = {}
    for i, name in enumerate(names):
        pair = deepliif[i % 2]
        y, x = 64 * i, 96 * i
        crops[name] = (pair.source[y : y + size, x : x + size], pair.target[y : y + size, x : x + size])
        Image.fromarray(crops[name][0]).save(a_dir / f"{name}.png")
        Image.fromarray(crops[name][1]).save(b_dir / f"{name}.png")
    return crops


@pytest.mark.parametrize("layout", ["bci", "pix2pix"])
def test_paired_folders_load_and_pair_by_name(deepliif, tmp_path, layout):
    if layout == "bci":
        a, b = tmp_path / "HE" / "test", tmp_path / "IHC" / "test"
    else:
        a, b = tmp_path / "testA", tmp_path / "testB"
    crops = _write_pairs(deepliif, a, b, names=("c3", "a1", "b2"))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "stray.png")  # outside the layout: ignored
    kw = {} if layout == "bci" else {"target_stain": "Ki-67"}
    ds = PairedStainDataset.from_folders(tmp_path, split="test", **kw)
    assert ds.target_stain == ("her2" if layout == "bci" else "ki67")  # BCI is HER2
    assert [p.name for p in ds.pairs] == ["a1", "b2", "c3"] and len(ds) == 3
    for i, name in enumerate(["a1", "b2", "c3"]):
        item = ds[i]
        assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), crops[name][0])
        assert np.array_equal(item["target"].permute(1, 2, 0).numpy(), crops[name][1])
    patches = PairedStainDataset.from_folders(tmp_path, split="test", size=32, **kw)
    assert len(patches) == 12 and patches[5]["target"].shape == (3, 32, 32)
    assert np.array_equal(patches[5]["target"].permute(1, 2, 0).numpy(), crops["b2"][1][0:32, 32:64])


def test_paired_folder_errors_name_the_files(deepliif, tmp_path):
    a, b = tmp_path / "trainA", tmp_path / "trainB"
    _write_pairs(deepliif, a, b)
    Image.fromarray(deepliif[0].source[:64, :64]).save(a / "lonely.png")
    with pytest.raises(StainError, match=r"unpaired.*only in .*trainA: lonely\.png"):
        folder_pairs(tmp_path)
    (a / "lonely.png").unlink()
    Image.fromarray(deepliif[0].target[:48, :64]).save(b / "case_b.png")
    with pytest.raises(StainError, match=r"case_b\.png is 64x64 but .*trainB/case_b\.png is 64x48"):
        folder_pairs(tmp_path)
    Image.fromarray(deepliif[0].target[:64, :64]).save(b / "case_b.png")
    with pytest.raises(StainError, match="pass target_stain"):
        PairedStainDataset.from_folders(tmp_path)
    with pytest.raises(StainError, match="HE/val.*valA"):
        folder_pairs(tmp_path, split="val")
    (tmp_path / "HE" / "val").mkdir(parents=True)
    (tmp_path / "IHC" / "val").mkdir(parents=True)
    with pytest.raises(StainError, match=r"HE/val: no images"):
        folder_pairs(tmp_path, split="val")


def test_unknown_target_stain_and_mismatched_pair_sizes_are_refused(deepliif):
    from synthgen.data.pairs import ImagePair

    with pytest.raises(StainError, match="unknown stain 'Ki76'"):
        PairedStainDataset(deepliif, target_stain="Ki76")
    bad = ImagePair(deepliif[0].source, deepliif[0].target[:100], "bad")
    with pytest.raises(StainError, match="differ in size"):
        PairedStainDataset([bad], target_stain="ki67")


# -- pair folders (synthgen pairs) -----------------------------------------------------------------
def _corner(name: str) -> tuple[int, int]:
    parts = Path(name).stem.split("_")
    return int(parts[1]), int(parts[2])


def test_pair_folders_keep_the_holdout_band_apart_and_views_aligned(stains, tmp_path):
    from synthgen.data.pair_folders import write_pair_folders
    from synthgen.data.pairs import register_sections

    d = stains / "anhir-rat-kidney"
    pair = register_sections(d / "Rat-Kidney_HE.jpg", d / "Rat-Kidney_PanCytokeratin.jpg",
                             d / "Rat-Kidney_HE.csv", d / "Rat-Kidney_PanCytokeratin.csv")
    pair.name = "kidney"
    info = write_pair_folders([pair], tmp_path, 64, stride=64, test_stride=32, holdout=(0.4, 0.6), dihedral=True)
    W = pair.source.shape[1]
    x0, x1 = round(0.4 * W), round(0.6 * W)
    train = sorted(p.name for p in (tmp_path / "trainA").iterdir())
    test = sorted(p.name for p in (tmp_path / "testA").iterdir())
    assert train == sorted(p.name for p in (tmp_path / "trainB").iterdir())
    assert test == sorted(p.name for p in (tmp_path / "testB").iterdir())
    assert info["counts"] == {"train": len(train), "test": len(test)} and len(test) > 20 and len(train) > 8 * 20
    assert len(train) % 8 == 0  # eight dihedral views of each training patch, none of the test ones
    for n in train:  # training patches never touch the band, test patches lie inside it
        x, _ = _corner(n)
        assert x + 64 <= x0 or x >= x1, n
    for n in test:
        x, _ = _corner(n)
        assert x0 <= x and x + 64 <= x1, n
    # files hold the registered pair at their corner; view k is the same transform of both stains
    name = test[len(test) // 2]
    x, y = _corner(name)
    a = np.asarray(Image.open(tmp_path / "testA" / name))
    b = np.asarray(Image.open(tmp_path / "testB" / name))
    np.testing.assert_array_equal(a, pair.source[y : y + 64, x : x + 64])
    np.testing.assert_array_equal(b, pair.target[y : y + 64, x : x + 64])
    stem = Path(train[0]).stem.rsplit("_", 1)[0]
    x, y = _corner(train[0])
    a0, b0 = pair.source[y : y + 64, x : x + 64], pair.target[y : y + 64, x : x + 64]
    a5 = np.asarray(Image.open(tmp_path / "trainA" / f"{stem}_5.png"))
    b5 = np.asarray(Image.open(tmp_path / "trainB" / f"{stem}_5.png"))
    np.testing.assert_array_equal(a5, np.rot90(a0, 1)[:, ::-1])
    np.testing.assert_array_equal(b5, np.rot90(b0, 1)[:, ::-1])
    with pytest.raises(StainError, match="holdout band"):
        write_pair_folders([pair], tmp_path / "x", 64, holdout=(0.6, 0.4))


def test_downsample_pair_is_a_box_mean_and_keeps_validity_strict():
    from synthgen.data.pair_folders import downsample_pair
    from synthgen.data.pairs import ImagePair

    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (9, 8, 3), dtype=np.uint8)
    valid = np.ones((9, 8), bool)
    valid[0, 0] = False
    p = downsample_pair(ImagePair(src, 255 - src, "p", valid), 2)
    assert p.source.shape == (4, 4, 3) and p.valid.shape == (4, 4)
    expect = np.round(src[:8].astype(float).reshape(4, 2, 4, 2, 3).mean((1, 3)))
    np.testing.assert_array_equal(p.source, expect.astype(np.uint8))
    assert not p.valid[0, 0] and p.valid[1:, :].all() and p.valid[0, 1:].all()


def test_pairs_cli_cuts_a_deepliif_strip_and_refuses_bad_arguments(stains, tmp_path, capsys):
    from cli_helpers import run_cli

    run_cli(["pairs", str(stains / "deepliif" / "Lung1.png"), "--deepliif", "-o", str(tmp_path / "p"),
             "--downsample", "4", "--size", "32", "--stride", "16", "--holdout", "0.5:1", "--min-tissue", "0"])
    info = __import__("json").loads((tmp_path / "p" / "pairs.json").read_text())
    assert info["pairs"][0]["registration"] == "translation"  # the ~7 px panel offset was measured
    n_train, n_test = len(list((tmp_path / "p" / "trainA").iterdir())), len(list((tmp_path / "p" / "testB").iterdir()))
    assert (n_train, n_test) == (info["counts"]["train"], info["counts"]["test"]) and n_train > 0 and n_test > 0
    assert np.asarray(Image.open(next((tmp_path / "p" / "trainB").iterdir()))).shape == (32, 32, 3)
    from synthgen.cli import main

    for args, msg in ((["pairs", str(stains / "deepliif" / "Lung1.png"), "-o", str(tmp_path / "q")], "TARGET is required"),
                      (["pairs", str(stains / "deepliif" / "Lung1.png"), "--deepliif", "-o", str(tmp_path / "q"),
                        "--holdout", "0.7:0.2"], "0 <= X0 < X1 <= 1")):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code != 0 and msg in capsys.readouterr().err
