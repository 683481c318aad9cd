"""On-disk cache of generated synthetic items, so epochs after the first reuse them.

One safetensors file per synthetic item, named by its (seed, index) key, inside a folder named by
a hash of the settings that fix the item (generator fingerprint, seed, the synthetic plan): a
cache made with other settings lives in another folder and is never read. Files are written to a
temporary name (unique per process and thread) and renamed, so concurrent DataLoader workers,
DDP ranks or a background fill never see half a file, and two writers of one item never clash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from synthgen._io import atomic_path, atomic_write_text
from synthgen.errors import CacheError


class ItemCache:
    """Generated uint8 images on disk, keyed by (seed, index), in ``root/<settings hash>/``.

    Args:
        root: the cache folder (shared by runs with different settings).
        settings: JSON-able description of everything the items depend on; its hash names the
            sub-folder, and ``settings.json`` inside records it.

    Raises:
        CacheError: the sub-folder's ``settings.json`` records other settings (a corrupt cache).
    """

    def __init__(self, root: str | os.PathLike, settings: dict):
        text = json.dumps(settings, sort_keys=True, indent=1)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.dir = Path(root) / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        record = self.dir / "settings.json"
        if not record.exists():
            atomic_write_text(record, text)
        elif json.loads(record.read_text()) != json.loads(text):
            raise CacheError(f"{record}: made with other settings than its folder name says; delete {self.dir}")

    def path(self, seed: int, index: int) -> Path:
        return self.dir / f"seed{seed}-{index:08d}.safetensors"

    def get(self, seed: int, index: int) -> torch.Tensor | None:
        """The cached image of item (seed, index), or None."""
        from safetensors.torch import load_file

        f = self.path(seed, index)
        if not f.exists():
            return None
        try:
            return load_file(f)["image"]
        except Exception as e:  # noqa: BLE001 - any unreadable file is a corrupt cache
            raise CacheError(f"{f}: unreadable cached item ({e}); delete it to regenerate") from e

    def put(self, seed: int, index: int, image: torch.Tensor) -> None:
        """Store one uint8 (3, H, W) image atomically."""
        from safetensors.torch import save_file

        with atomic_path(self.path(seed, index)) as tmp:  # full disk, Ctrl-C: no partial file
            save_file({"image": image.contiguous()}, tmp)
