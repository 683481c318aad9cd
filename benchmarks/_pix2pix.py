"""pix2pix baseline for virtual IHC (Isola et al. 2017), trained on the same pairs as synthgen's translator.

The field's image-to-image reference (BCI's pix2pix / PyramidPix2pix): a U-Net generator with
skip connections (encoder C64-C128-C256-C512-..., decoder with dropout 0.5 in its first three
layers) and a 70x70 PatchGAN discriminator (:class:`synthgen.models.discriminator.PatchDiscriminator`,
3 stride-2 layers) conditioned on the source by channel concatenation; loss = GAN (the paper's
BCE) + 100 x L1; Adam lr 2e-4, betas (0.5, 0.999). Differences from the paper, for a CPU: 64 px
tiles (6 down-samplings instead of 8), batch 16 instead of 1, GroupNorm instead of BatchNorm in
the discriminator, a fixed wall-clock budget instead of 200 epochs, inference without dropout.

It lives in ``benchmarks/``, not in the package: it is the baseline synthgen's translator must beat.
It trains the baseline and measures nothing (no headline line), hence the helper's leading underscore;
``benchmarks/virtual_stain.py --pix2pix DIR`` scores it.

    OMP_NUM_THREADS=2 python benchmarks/_pix2pix.py runs/ki67/pairs -o runs/ki67/pix2pix --minutes 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class UNetGenerator(nn.Module):
    """pix2pix U-Net: ``depth`` stride-2 convs down to 1x1 at 64 px, mirrored with skip connections."""

    def __init__(self, width: int = 64, depth: int = 6, dropout: float = 0.5):
        super().__init__()
        chans = [min(width * 2**i, width * 8) for i in range(depth)]
        self.down = nn.ModuleList()
        prev = 3
        for i, c in enumerate(chans):
            layers = [nn.Conv2d(prev, c, 4, 2, 1)]
            if 0 < i < depth - 1:
                layers.append(nn.BatchNorm2d(c))
            self.down.append(nn.Sequential(*layers))
            prev = c
        self.up = nn.ModuleList()
        for i in reversed(range(depth)):
            cin = chans[i] if i == depth - 1 else chans[i] * 2
            cout = chans[i - 1] if i > 0 else 3
            layers: list[nn.Module] = [nn.ReLU(), nn.ConvTranspose2d(cin, cout, 4, 2, 1)]
            if i > 0:
                layers.append(nn.BatchNorm2d(cout))
                if i >= depth - 3 and dropout:
                    layers.append(nn.Dropout(dropout))
            self.up.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Source images in [-1, 1] -> target images in [-1, 1]."""
        skips = []
        for i, d in enumerate(self.down):
            x = d(x if i == 0 else F.leaky_relu(x, 0.2))
            skips.append(x)
        for i, u in enumerate(self.up):
            x = u(x if i == 0 else torch.cat([x, skips[-1 - i]], 1))
        return torch.tanh(x)


def load_folder(folder: Path) -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    names = sorted(p.name for p in folder.glob("*.png"))
    if not names:
        raise SystemExit(f"{folder}: no PNG tiles")
    return np.stack([np.asarray(Image.open(folder / n).convert("RGB")) for n in names]), names


def to_unit(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train(pairs: Path, out: Path, minutes: float, batch_size: int = 16, seed: int = 0, l1_weight: float = 100.0,
          log_every: int = 100) -> dict:
    """Train on ``pairs/trainA`` -> ``pairs/trainB`` for ``minutes`` of wall time; save to ``out``."""
    from synthgen.models.discriminator import PatchDiscriminator

    torch.manual_seed(seed)
    a, names_a = load_folder(pairs / "trainA")
    b, names_b = load_folder(pairs / "trainB")
    if names_a != names_b:
        raise SystemExit(f"{pairs}: trainA and trainB hold different file names")
    A, B = to_unit(a), to_unit(b)
    G, D = UNetGenerator(), PatchDiscriminator(in_channels=6, width=64, num_layers=3)
    opt_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    g = torch.Generator().manual_seed(seed)
    t0, step, log = time.perf_counter(), 0, []
    while time.perf_counter() - t0 < minutes * 60:
        idx = torch.randint(0, len(A), (batch_size,), generator=g)
        x, y = A[idx], B[idx]
        fake = G(x)
        # discriminator: real pairs -> 1, generated pairs -> 0 (the paper halves its loss)
        d_real, d_fake = D(torch.cat([x, y], 1)), D(torch.cat([x, fake.detach()], 1))
        loss_d = 0.5 * (bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake)))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        d_fake = D(torch.cat([x, fake], 1))
        l1 = F.l1_loss(fake, y)
        loss_g = bce(d_fake, torch.ones_like(d_fake)) + l1_weight * l1
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        step += 1
        if step % log_every == 0:
            log.append({"step": step, "seconds": round(time.perf_counter() - t0, 1), "l1": l1.item(),
                        "loss_d": loss_d.item()})
            print(f"step {step} {log[-1]['seconds']} s  L1 {l1.item():.4f}  D {loss_d.item():.3f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    info = {"steps": step, "minutes": minutes, "batch_size": batch_size, "pairs": len(A), "seed": seed, "log": log}
    torch.save(G.state_dict(), out / "generator.pt")
    (out / "train.json").write_text(json.dumps(info, indent=1))
    return info


@torch.no_grad()
def translate(generator_dir: Path, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 (N, H, W, 3) sources -> uint8 (N, H, W, 3) virtual IHC with a trained generator."""
    G = UNetGenerator()
    G.load_state_dict(torch.load(generator_dir / "generator.pt", map_location="cpu"))
    G.eval()
    out = [G(to_unit(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    y = torch.cat(out).permute(0, 2, 3, 1)
    return ((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs", type=Path, help="folder with trainA/ (source) and trainB/ (target), same file names")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, required=True, help="wall-clock training budget")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    info = train(a.pairs, a.out, a.minutes, a.batch_size, a.seed)
    print(f"trained {info['steps']} steps in {a.minutes} min on {info['pairs']} pairs -> {a.out}")
    return info


if __name__ == "__main__":
    main()
