"""Run by torchrun in test_training: train, then write this rank's parameter digest."""

import hashlib
import os
import sys
from pathlib import Path

from synthgen.config import load_train_config
from synthgen.training.trainer import train

cfg_file, out = sys.argv[1], Path(sys.argv[2])
res = train(load_train_config(cfg_file), progress=False)
h = hashlib.sha256()
for k, v in sorted(res.model.state_dict().items()):
    h.update(k.encode())
    h.update(v.detach().cpu().float().numpy().tobytes())
rank = int(os.environ.get("RANK", 0))  # set by torchrun
world = res.num_processes  # what accelerate saw
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{rank}.txt").write_text(f"world={world} {h.hexdigest()}")
