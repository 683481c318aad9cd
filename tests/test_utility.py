import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from synthgen.studies.utility import oversampled, utility_study


class Crops(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture(scope="module")
def task(kather):
    """3 classes of real 32 px crops (tumour, stroma, lymphocytes): training tiles 1-2 of each
    class, test tile 3; the rare class has 3 training crops against 40."""
    g = torch.Generator().manual_seed(0)
    classes = ["01_TUMOR", "02_STROMA", "04_LYMPHO"]

    def crops(path, n):
        img = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        out = []
        for _ in range(n):
            y, x = torch.randint(0, 150 - 48, (2,), generator=g).tolist()
            out.append(torch.nn.functional.interpolate(img[None, :, y : y + 48, x : x + 48].float(), size=32)[0]
                       .round().to(torch.uint8))
        return out

    train, test, pool = [], [], {}
    for c, name in enumerate(classes):
        tiles = sorted((kather / name).iterdir())
        n = 3 if c == 2 else 40
        train += [(x, c) for x in crops(tiles[0], n // 2 + n % 2) + crops(tiles[1], n // 2)]
        pool[c] = crops(tiles[0], 30) + crops(tiles[1], 30)  # more of the same training tiles
        test += [(x, c) for x in crops(tiles[2], 20)]
    return Crops(train), Crops(test), [y for _, y in train], pool


def test_planted_easy_task_orders_the_arms(task):
    """An oracle generator (new crops of the class from the training tiles) must help the rare
    class: the synthgen arm beats the real arm on rare-class recall."""
    train, test, labels, pool = task

    def oracle(labels_, refs, seeds):
        return torch.stack([pool[c][s % len(pool[c])] for c, s in zip(labels_, seeds, strict=True)])

    rep = utility_study(train, test, labels, oracle, seeds=(0, 1, 2), epochs=20)
    arms = rep["arms"]
    assert rep["rare_class"] == 2 and rep["train_counts"] == {0: 40, 1: 40, 2: 3}
    assert arms["synthgen"]["rare_class_recall"]["mean"] > arms["real"]["rare_class_recall"]["mean"] + 0.2
    assert arms["synthgen"]["balanced_accuracy"]["mean"] > arms["real"]["balanced_accuracy"]["mean"]
    assert arms["synthetic_only"]["balanced_accuracy"]["mean"] > 0.5  # chance is 1/3
    assert set(arms) == {"real", "classical", "oversample", "synthgen", "synthetic_only"}
    lo, hi = arms["real"]["balanced_accuracy"]["ci95"]
    assert lo <= arms["real"]["balanced_accuracy"]["mean"] <= hi


def test_oversample_arm_adds_the_synthgen_arms_sizes_from_real_images(task):
    from synthgen.augment import SynthPolicy

    train, _, labels, _ = task
    policy = SynthPolicy.balance(labels)
    data = oversampled(train, labels, policy, seed=0)
    got = [labels[i] for i in data.indices]
    assert data.indices[: len(labels)] == list(range(len(labels)))  # every real item once, then the extra ones
    assert {c: got.count(c) - labels.count(c) for c in set(labels)} == {0: 0, 1: 0, 2: 9}  # 3 rare crops, 1:3
    assert data.indices != oversampled(train, labels, policy, seed=1).indices  # the draw follows the seed


def test_utility_argument_errors(task):
    train, test, labels, _ = task
    with pytest.raises(ValueError, match="unknown arm"):
        utility_study(train, test, labels, None, arms=("real", "gan"))
    with pytest.raises(ValueError, match="need a generator"):
        utility_study(train, test, labels, None, arms=("synthgen",))


def _kather_split(kather, root, classes, rare):
    """ImageFolder train/ (tiles 1-2 of each class, tile 1 only of ``rare``) and test/ (tile 3)."""
    import shutil

    for name in classes:
        tiles = sorted((kather / name).iterdir())
        for part, picked in (("train", tiles[:1] if name == rare else tiles[:2]), ("test", tiles[2:3])):
            (root / part / name).mkdir(parents=True)
            for f in picked:
                shutil.copy(f, root / part / name / f.name)
    return root / "train", root / "test"


def test_eval_utility_cli_prior_mode(kather, tmp_path):
    """`synthgen eval utility --mode prior`: the rare class gets fresh samples from the pipeline's
    prior (class folders matched by name), and the report names the prior."""
    import json
    from pathlib import Path

    from cli_helpers import run_cli

    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "synthgen-small-cmu"
    train, test = _kather_split(kather, tmp_path, ["01_TUMOR", "02_STROMA", "04_LYMPHO"], rare="04_LYMPHO")
    out = tmp_path / "u.json"
    run_cli(["eval", "utility", str(train), str(test), "--pipeline", str(ckpt), "--mode", "prior", "--seeds", "1",
             "--epochs", "2", "--steps", "2", "--json", str(out)])
    rep = json.loads(out.read_text())
    assert rep["generator"] == {"mode": "prior", "prior": str(ckpt / "prior")}
    assert rep["classes"] == ["01_TUMOR", "02_STROMA", "04_LYMPHO"] and rep["train_counts"] == {"0": 2, "1": 2, "2": 1}
    assert rep["rare_class"] == 2 and set(rep["arms"]) == {"real", "classical", "oversample", "synthgen", "synthetic_only"}
    for arm in rep["arms"].values():
        assert 0 <= arm["balanced_accuracy"]["mean"] <= 1 and len(arm["per_class_recall"]) == 3


def test_eval_utility_prior_errors_are_named(kather, tmp_path, capsys):
    from pathlib import Path

    from synthgen.cli import main

    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "synthgen-small-cmu"
    train, test = _kather_split(kather, tmp_path, ["01_TUMOR", "02_STROMA"], rare="02_STROMA")
    for part in (train, test):
        (part / "09_FOO").mkdir()
        Image.new("RGB", (64, 64)).save(part / "09_FOO" / "x.png")
    for args, message in ((["--mode", "prior"], "'09_FOO' matches no class of the prior"),
                          (["--mode", "variations", "--prior", str(ckpt / "prior")], "--prior is for --mode prior")):
        with pytest.raises(SystemExit) as e:
            main(["eval", "utility", str(train), str(test), "--pipeline", str(ckpt), "--seeds", "1", *args])
        assert e.value.code != 0 and message in capsys.readouterr().err
