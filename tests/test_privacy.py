import json

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from PIL import Image

from synthgen.cli import main
from synthgen.errors import SynthgenError
from synthgen.export.writers import export_dataset
from synthgen.metrics.privacy import memorization_audit

CKPT = "checkpoints/synthgen-small-cmu"




@pytest.fixture(scope="module")
def planted(cmu, tmp_path_factory):
    """A generate-style output: 6 images from the default pipeline plus 2 exact and 2 lightly
    augmented (flip, brightness, noise) copies of training tiles; and the training tile table."""
    from pathlib import Path

    from synthgen.data.datasets import PatchDataset
    from synthgen.pipelines.generate import SynthPipeline

    root = tmp_path_factory.mktemp("privacy")
    run_cli(["tile", str(cmu), "--mpp", "1.0", "--size", "64", "--overlap", "32", "--roi", "0,0,0.67,1",
          "-o", str(root / "train.csv")])
    train = PatchDataset(root / "train.csv")
    repo = Path(__file__).resolve().parents[1]
    pipe = SynthPipeline.from_pretrained(repo / CKPT)
    pipe.set_progress_bar_config(disable=True)
    refs = torch.stack([train[i]["image"] for i in (5, 50, 100, 150, 200, 250)])
    gen = pipe(images=refs, seeds=list(range(6)), num_inference_steps=8, output_type="np").images
    rng = np.random.default_rng(0)
    copies = [train[i]["image"].permute(1, 2, 0).numpy() for i in (10, 60, 120, 180)]
    copies[2] = np.ascontiguousarray(copies[2][:, ::-1])  # flipped
    copies[3] = np.clip(copies[3].astype(int) + 6 + rng.normal(0, 3, copies[3].shape), 0, 255).astype(np.uint8)
    images = list(gen) + copies
    (root / "gen" / "images").mkdir(parents=True)
    items = []
    for i, img in enumerate(images):
        rel = f"images/{i:07d}.png"
        Image.fromarray(img).save(root / "gen" / rel)
        items.append({"index": i, "file": rel, "seed": i, "label": None, "condition": "variations", "accepted": None})
    (root / "gen" / "manifest.json").write_text(json.dumps({"num_items": len(items), "items": items}))
    return root


def test_gate_flags_planted_copies_and_passes_generated_tiles(planted):
    from synthgen.workflows.audit import audit as _audit

    audit = _audit(planted / "gen", planted / "train.csv", f"ssl:{CKPT}/image_encoder", 0.5)
    assert audit["flagged"] == [False] * 6 + [True] * 4, audit


def test_export_refuses_drops_or_records_risk(planted, tmp_path, capsys):
    base = ["export", str(planted / "gen"), "--audit-against", str(planted / "train.csv"),
            "--audit-encoder", f"ssl:{CKPT}/image_encoder"]
    with pytest.raises(SystemExit) as e:
        main([*base, "-o", str(tmp_path / "refused")])
    assert e.value.code == 1 and "export refused: 4 of 10 items" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    run_cli([*base, "-o", str(tmp_path / "dropped"), "--drop-flagged"])
    m = json.loads((tmp_path / "dropped" / "manifest.json").read_text())
    assert m["num_items"] == 6 and m["privacy_audit"]["n_flagged"] == 4 and m["privacy_audit"]["dropped_flagged"]
    assert "No memorisation audit" not in (tmp_path / "dropped" / "DATASHEET.md").read_text()
    run_cli([*base, "-o", str(tmp_path / "risky"), "--allow-risk"])
    m = json.loads((tmp_path / "risky" / "manifest.json").read_text())
    assert m["num_items"] == 10 and m["privacy_audit"]["allow_risk"] and sum(r["flagged"] for r in m["items"]) == 4


def test_audit_input_checks(planted, tmp_path):
    with pytest.raises(ValueError, match="at least 2 real"):
        memorization_audit(torch.randn(3, 4), torch.randn(1, 4))
    with pytest.raises(SynthgenError, match="audit covers 1 items but"):
        export_dataset(planted / "gen", tmp_path / "x", audit={"flagged": [True], "ratio": [0.1], "threshold": 0.5,
                                                               "flagged_fraction": 1.0, "n_real": 2})
