"""Feature cache: VAE latents and conditioning embeddings computed once, read by training.

A cache is a folder::

    config.json             what was encoded and how (checked on every rerun), class and source names
    shard-00000.safetensors one tensor per encoder (n, ...), plus "index", "label" and "source"
    shard-00001.safetensors
    index.json              written last: shard list, item counts, sha256 of each shard

Shards are written to a temporary file and renamed, so a killed run leaves only whole shards;
a rerun with the same configuration skips them. ``index.json`` exists only once every shard
is done, and :class:`CacheDataset` refuses a cache without it.

A labelled tile table (``synthgen splits``) is cached through :class:`LabelledTiles`: ``label``
holds the class id (-1 for a tile without a class) and ``source`` the tissue-source id, with
their names in ``config.json`` (``classes``, ``sources``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from synthgen._io import OutputLock, atomic_path, atomic_write_text, sha256_file
from synthgen.errors import CacheError

FORMAT_VERSION = 1
Encoder = Callable[[torch.Tensor], torch.Tensor]


def shard_path(out_dir: Path, i: int) -> Path:
    return out_dir / f"shard-{i:05d}.safetensors"


def build_cache(
    dataset: Dataset,
    out_dir: str | os.PathLike,
    encoders: Mapping[str, Encoder],
    *,
    shard_size: int = 1024,
    batch_size: int = 32,
    num_workers: int = 0,
    dtype: torch.dtype = torch.float32,
    fingerprint: Mapping | None = None,
    classes: list[str] | None = None,
    progress: bool = True,
    sources: list[str] | None = None,
    force: bool = False,
    mpp: float | None = None,
) -> Path:
    """Encode every item of ``dataset`` with every encoder into sharded safetensors files.

    Args:
        dataset: map-style dataset of dicts with ``image`` (uint8, 3 x H x W) and optionally
            ``label`` and ``mask`` (an H x W label map), stored as they are (e.g.
            :class:`~synthgen.data.PatchDataset`).
        out_dir: cache folder (created).
        encoders: name -> callable taking a uint8 batch (B, 3, H, W) and returning a float
            tensor (B, ...). Encoders own their preprocessing. ``latents`` is the name the
            trainer reads VAE latents from.
        shard_size: items per shard file.
        batch_size, num_workers: DataLoader settings for reading images.
        dtype: floating dtype stored on disk (float16 halves the size).
        fingerprint: extra JSON-able facts identifying the data and encoders (e.g. the tile
            table's hash and the encoder checkpoints); a rerun with other facts refuses.
        classes: names of the label ids 0, 1, ... (stored in config.json; :attr:`CacheDataset.classes`).
        progress: show a progress bar.
        sources: names of the ``source`` ids 0, 1, ... (:attr:`CacheDataset.sources`); default:
            the dataset's ``sources`` attribute, if any (:class:`LabelledTiles`).
        force: take over the folder's lock (``.synthgen.lock``) even when its owner looks alive.
        mpp: the items' resolution in um/px (stored as :attr:`CacheDataset.mpp`, read by
            ``synthgen assemble`` to record a pipeline's scale); default: the dataset's ``mpp``
            attribute, if any (a tile table's shared resolution).

    Returns:
        The cache folder.

    Raises:
        CacheError: the folder holds a cache of another configuration, or an encoder
            returned NaN/Inf (the message names the encoder and the items).
        LockError: another live process is writing this cache folder.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if not encoders:
        raise CacheError("build_cache: give at least one encoder")
    if shard_size <= 0 or batch_size <= 0:
        raise CacheError(f"build_cache: shard_size and batch_size must be positive (got {shard_size}, {batch_size})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(out, "cache", force=force).acquire()  # one writer per cache folder
    try:
        n = len(dataset)
        if n == 0:
            raise CacheError("build_cache: the dataset is empty")
        config = {
            "format_version": FORMAT_VERSION,
            "num_items": n,
            "shard_size": shard_size,
            "encoders": sorted(encoders),
            "dtype": str(dtype).removeprefix("torch."),
            "fingerprint": dict(fingerprint or {}),
        }
        if classes is not None:
            config["classes"] = list(classes)
        if sources is None:
            sources = getattr(dataset, "sources", None)
        if sources is not None:
            config["sources"] = list(sources)
        mpp = getattr(dataset, "mpp", None) if mpp is None else mpp
        if mpp is not None:
            config["mpp"] = float(mpp)
        config_file = out / "config.json"
        if config_file.exists():
            old = json.loads(config_file.read_text())
            if "mpp" not in old:  # written before the scale was stored: the rest decides (the digest covers it)
                config.pop("mpp", None)
            if old != config:
                diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise CacheError(
                    f"{out}: holds a cache built with another configuration (differs in: {', '.join(diff)}); "
                    "use a new folder or delete this one"
                )
        else:
            atomic_write_text(config_file, json.dumps(config, indent=1, sort_keys=True))
        config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]

        num_shards = (n + shard_size - 1) // shard_size
        todo = [s for s in range(num_shards) if not _shard_ok(shard_path(out, s), config_hash)]
        bar = tqdm(total=n, desc="caching", unit="img", disable=not progress)
        bar.update(n - sum(min(shard_size, n - s * shard_size) for s in todo))
        for s in todo:
            lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
            loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size, num_workers=num_workers)
            parts: dict[str, list[torch.Tensor]] = {k: [] for k in encoders}
            labels: list[torch.Tensor] = []
            source_ids: list[torch.Tensor] = []
            masks: list[torch.Tensor] = []
            with torch.inference_mode():
                for batch in loader:
                    images = batch["image"]
                    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
                        raise CacheError(f"dataset items must have 'image' as uint8 3xHxW, got {images.dtype} "
                                         f"{tuple(images.shape[1:])}")
                    for name, enc in encoders.items():
                        feats = enc(images)
                        if not torch.isfinite(feats).all():
                            bad = (~torch.isfinite(feats.flatten(1))).any(1).nonzero().flatten()
                            done = sum(len(p) for p in parts[name])
                            idx = [lo + done + int(i) for i in bad][:5]
                            raise CacheError(f"encoder {name!r} returned NaN/Inf for dataset item(s) {idx} "
                                             f"(shard {s}); nothing of this shard was written")
                        parts[name].append(feats.detach().to("cpu", dtype if feats.is_floating_point() else feats.dtype))
                    if "label" in batch:
                        labels.append(torch.as_tensor(batch["label"]).long())
                    if "source" in batch:
                        source_ids.append(torch.as_tensor(batch["source"]).long())
                    if "mask" in batch:  # the dataset's own label maps (GeoJSON, label-map files)
                        masks.append(torch.as_tensor(batch["mask"]).to(torch.int32))
                    bar.update(len(images))
            tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
            tensors["index"] = torch.arange(lo, hi, dtype=torch.long)
            if labels:
                tensors["label"] = torch.cat(labels)
            if source_ids:
                tensors["source"] = torch.cat(source_ids)
            if masks and "mask" not in tensors:
                tensors["mask"] = torch.cat(masks)
            # one metadata key: safetensors stores metadata as a hash map, whose order varies by process
            with atomic_path(shard_path(out, s)) as tmp:  # removed if the write fails
                save_file(tensors, str(tmp), metadata={"config_hash": config_hash})
        bar.close()
        _write_index(out, num_shards, n, config_hash)
    finally:
        lock.release()
    return out


def _shard_ok(path: Path, config_hash: str) -> bool:
    if not path.exists():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("config_hash") == config_hash
    except Exception:
        return False  # unreadable leftovers are recomputed


def _write_index(out: Path, num_shards: int, n: int, config_hash: str) -> None:
    from safetensors import safe_open

    shards = []
    for s in range(num_shards):
        p = shard_path(out, s)
        with safe_open(str(p), framework="pt") as f:
            count = f.get_slice("index").get_shape()[0]
            shapes = {k: f.get_slice(k).get_shape()[1:] for k in f.keys()}
        shards.append({"file": p.name, "count": count, "sha256": sha256_file(p)})
    if sum(s["count"] for s in shards) != n:
        raise CacheError(f"{out}: shards hold {sum(s['count'] for s in shards)} items, expected {n}")
    index = {"format_version": FORMAT_VERSION, "config_hash": config_hash, "num_items": n,
             "keys": sorted(shapes), "item_shapes": shapes, "shards": shards}
    atomic_write_text(out / "index.json", json.dumps(index, indent=1))


class CacheDataset(Dataset):
    """Items of a finished feature cache: dicts of tensors (one per encoder, ``index``, ``label``).

    Shards are opened lazily per process and read by memory map, so random access is cheap and
    DataLoader workers do not share handles.

    Args:
        cache_dir: a folder written by :func:`build_cache`.
        keys: tensors to return (default: all).

    Attributes:
        classes: names of the label ids when the cache was built with them, else None.
        mpp: the items' resolution in um/px when it was known (a tile table's), else None.
        sources: names of the source ids when the cache was built with them, else None.

    Raises:
        CacheError: no ``index.json`` (the cache is unfinished) or a shard is missing.
    """

    def __init__(self, cache_dir: str | os.PathLike, keys: list[str] | None = None):
        self.root = Path(cache_dir)
        index_file = self.root / "index.json"
        if not index_file.exists():
            raise CacheError(f"{self.root}: no index.json; the cache is missing or unfinished "
                             "(rerun `synthgen cache`, it resumes)")
        self.index = json.loads(index_file.read_text())
        unknown = sorted(set(keys or []) - set(self.index["keys"]))
        if unknown:
            raise CacheError(f"{self.root}: cache has no {', '.join(unknown)} (has {', '.join(self.index['keys'])})")
        self.keys = list(keys) if keys is not None else list(self.index["keys"])
        config_file = self.root / "config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        self.classes, self.sources = config.get("classes"), config.get("sources")
        self.mpp = config.get("mpp")  # the items' resolution in um/px, when it was known
        self._starts = []
        total = 0
        for s in self.index["shards"]:
            if not (self.root / s["file"]).exists():
                raise CacheError(f"{self.root / s['file']}: shard listed in index.json is missing")
            self._starts.append(total)
            total += s["count"]
        self._n = total
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._n

    def _locate(self, i: int) -> tuple[int, int]:
        import bisect

        if not 0 <= i < self._n:
            raise IndexError(f"index {i} out of range for cache of {self._n} items")
        s = bisect.bisect_right(self._starts, i) - 1
        return s, i - self._starts[s]

    def _handle(self, s: int):
        from safetensors import safe_open

        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if s not in self._handles:
            self._handles[s] = safe_open(str(self.root / self.index["shards"][s]["file"]), framework="pt")
        return self._handles[s]

    def __getitem__(self, i: int) -> dict:
        s, j = self._locate(i)
        f = self._handle(s)
        item = {k: f.get_slice(k)[j : j + 1][0] for k in self.keys}
        for k in ("index", "label", "source"):
            if k in item:
                item[k] = int(item[k])
        return item

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def verify(self) -> None:
        """Re-hash every shard against index.json; raises CacheError naming a changed shard."""
        for s in self.index["shards"]:
            if sha256_file(self.root / s["file"]) != s["sha256"]:
                raise CacheError(f"{self.root / s['file']}: checksum differs from index.json (modified or corrupt)")


class LabelledTiles(Dataset):
    """A labelled tile table (from ``synthgen splits``) as :class:`~synthgen.data.PatchDataset`
    items plus ``label`` (class id, -1 where the table's label is empty) and ``source`` ids.

    The names come from the table's data definition when the ``summary.json`` beside it names
    a split file that still exists (so the train, val and test caches of one definition share
    their ids), else from the table itself; both sorted.

    Args:
        table: a tile table with ``source`` and ``label`` columns.
        slides: as for :class:`~synthgen.data.PatchDataset` (default: the table's ``.slides.json``).
        classes, sources: the names of the ids, to share them with another cache; a table value
            not among them raises.

    Attributes:
        classes, sources: names of the label / source ids (what :func:`build_cache` stores).

    Raises:
        CacheError: the table has no label columns, or holds a class/source not in the names.
    """

    def __init__(self, table: str | os.PathLike, slides: Mapping | None = None,
                 classes: Sequence[str] | None = None, sources: Sequence[str] | None = None):
        from synthgen.data.datasets import PatchDataset
        from synthgen.data.splits import read_tile_labels
        from synthgen.errors import SynthgenError

        try:
            rows = read_tile_labels(table)
        except SynthgenError as e:
            raise CacheError(str(e)) from e
        known = _definition_vocabulary(Path(table))
        self.classes = list(classes) if classes is not None else known.get("label") or sorted(
            {r["label"] for r in rows if r["label"]})
        self.sources = list(sources) if sources is not None else known.get("source") or sorted(
            {r["source"] for r in rows})
        ids = {"label": {n: i for i, n in enumerate(self.classes)}, "source": {n: i for i, n in enumerate(self.sources)}}
        for col in ("label", "source"):
            unknown = sorted({r[col] for r in rows if r[col] and r[col] not in ids[col]})
            if unknown:
                raise CacheError(f"{table}: {col} {', '.join(unknown[:5])} not among the names given "
                                 f"({', '.join(ids[col])})")
        self.labels = torch.tensor([ids["label"].get(r["label"], -1) for r in rows], dtype=torch.long)
        self.source_ids = torch.tensor([ids["source"][r["source"]] for r in rows], dtype=torch.long)
        self.tiles = PatchDataset(table, slides=slides)
        if len(self.tiles) != len(rows):
            raise CacheError(f"{table}: {len(self.tiles)} tiles but {len(rows)} label rows")

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def mpp(self) -> float | None:
        return self.tiles.mpp

    def __getitem__(self, i: int) -> dict:
        item = self.tiles[i]
        item["label"], item["source"] = int(self.labels[i]), int(self.source_ids[i])
        return item


def _definition_vocabulary(table: Path) -> dict[str, list[str]]:
    """Sorted label and source names of the split file that ``summary.json`` beside ``table``
    names ({} when there is none)."""
    import csv

    summary = table.parent / "summary.json"
    try:
        split_file = Path(json.loads(summary.read_text())["split_file"])
        with open(split_file, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {col: sorted({r.get(col) or "" for r in rows} - {""}) for col in ("label", "source")}
