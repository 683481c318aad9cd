"""Faults: a full disk leaves no temporary file behind, OS errors name their file, and the
output-folder lock keeps two writers apart (taking over the lock of a dead one)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from synthgen._io import (
    LOCK_NAME,
    OutputLock,
    atomic_dir,
    atomic_path,
    atomic_save_png,
    atomic_write_bytes,
)
from synthgen.cli import main, os_error_message
from synthgen.errors import LockError

REPO = Path(__file__).resolve().parents[1]
PIPE = REPO / "checkpoints" / "synthgen-small-cmu"


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


def _cli(args, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


# -- temporary files ------------------------------------------------------------------------
def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_writers_remove_their_temp_file_on_a_failed_write(tmp_path, monkeypatch):
    from PIL import Image

    from synthgen.data.masks import write_label_map

    (tmp_path / "keep.png").write_bytes(b"old")
    monkeypatch.setattr(Path, "write_bytes", _enospc)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(tmp_path / "keep.png", b"new")
    assert e.value.filename == str(tmp_path / "keep.png")  # named, so the CLI never prints ': '
    with pytest.raises(OSError):
        atomic_save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png")
    monkeypatch.undo()
    monkeypatch.setattr(Image.Image, "save", _enospc)
    with pytest.raises(OSError):
        write_label_map(tmp_path / "m.png", np.ones((4, 4), np.uint8))
    assert _leftovers(tmp_path) == [] and (tmp_path / "keep.png").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]


def test_atomic_path_removes_a_partial_file_on_any_exception(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "x.bin") as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_path(tmp_path / "x.bin") as tmp:
        tmp.write_bytes(b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_atomic_dir_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(out) as tmp:
        (tmp / "weights").write_text("half")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (out / "weights").read_text() == "old"
    with atomic_dir(out) as tmp:
        assert list(tmp.iterdir()) == [] and tmp.parent == tmp_path
        (tmp / "weights").write_text("new")
        assert (out / "weights").read_text() == "old"  # readers see the old folder meanwhile
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (out / "weights").read_text() == "new"


def test_generate_on_a_full_disk_keeps_finished_items_and_no_temp_file(tmp_path, monkeypatch, capsys):
    """The 4th image write fails with ENOSPC: exit 1 naming the file, images 0-2 kept, no temp file."""
    from PIL import Image

    save, calls = Image.Image.save, {"n": 0}

    def full_after_three(self, fp, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3 and "images" in str(fp):
            Path(fp).write_bytes(b"partial")  # a half-written file, as a full disk leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", full_after_three)
    code, err = _cli(["generate", PIPE, "-o", tmp_path / "g", "-n", 6, "--steps", 1, "--batch-size", 6,
                      "--class", "0"], capsys)
    assert code == 1 and "No space left on device" in err and "Error: :" not in err
    assert str(tmp_path / "g" / "images" / "0000003.png") in err
    assert _leftovers(tmp_path / "g") == []
    assert sorted(p.name for p in (tmp_path / "g" / "images").iterdir()) == [f"{i:07d}.png" for i in range(3)]
    assert not (tmp_path / "g" / LOCK_NAME).exists()  # released on the way out
    monkeypatch.undo()
    code, _ = _cli(["generate", PIPE, "-o", tmp_path / "g", "-n", 6, "--steps", 1, "--batch-size", 6,
                    "--class", "0"], capsys)  # the rerun finishes the rest
    assert code == 0 and len(json.loads((tmp_path / "g" / "manifest.json").read_text())["items"]) == 6


@pytest.fixture
def small_fs(tmp_path):
    """A 64 KiB tmpfs (needs root and mount permission; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({(r.stderr or r.stdout).strip() or r.returncode}); "
                    "the ENOSPC behaviour is covered by the monkeypatched tests")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_writers_on_a_really_full_filesystem_leave_nothing_partial(small_fs, capsys):
    from synthgen.data.masks import write_label_map

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)  # ~27 KB as PNG: the third one does not fit
    written = []
    with pytest.raises(OSError) as e:
        for i in range(10):
            atomic_save_png(noise, small_fs / f"{i}.png")
            written.append(f"{i}.png")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(small_fs / f"{len(written)}.png")
    with pytest.raises(OSError):
        for i in range(10):
            write_label_map(small_fs / f"m{i}.png", rng.integers(0, 60000, (128, 128)).astype(np.uint16))
    assert _leftovers(small_fs) == []
    assert sorted(p.name for p in small_fs.iterdir() if p.suffix == ".png" and not p.name.startswith("m")) == written
    for name in written:  # the files that were reported written are whole
        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(small_fs / name)), noise)


def test_generate_onto_a_full_tmpfs(small_fs, capsys):
    code, err = _cli(["generate", PIPE, "-o", small_fs / "g", "-n", 40, "--steps", 1, "--batch-size", 40,
                      "--class", "0"], capsys)
    assert code == 1 and "No space left on device" in err and "Error: :" not in err and str(small_fs) in err
    assert _leftovers(small_fs) == []


def test_os_errors_always_name_their_file():
    assert os_error_message(OSError(errno.ENOSPC, "No space left on device", "/x/a.png")) == \
        "/x/a.png: No space left on device"
    assert os_error_message(OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b")) == \
        "/a -> /b: Invalid cross-device link"
    assert not os_error_message(OSError(errno.ENOSPC, "No space left on device")).startswith(":")


# -- the output-folder lock -----------------------------------------------------------------
def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from synthgen._io import OutputLock\n"
        f"OutputLock({str(tmp_path)!r}, 'generate').acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == holder.pid and owner["host"] == socket.gethostname()
        with pytest.raises(LockError, match=f"pid {holder.pid}.*--force"):
            OutputLock(tmp_path, "generate").acquire()
        os.kill(holder.pid, signal.SIGKILL)  # the owner dies without releasing
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
    capsys.readouterr()
    with OutputLock(tmp_path, "generate"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert f"stale lock of dead process {holder.pid}" in capsys.readouterr().err
    assert not (tmp_path / LOCK_NAME).exists()


def test_force_and_other_ranks(tmp_path, capsys):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "train"}))
    with pytest.raises(LockError, match="elsewhere"):  # another host: its pid cannot be checked
        OutputLock(tmp_path).acquire()
    with OutputLock(tmp_path, force=True):
        assert "--force" in capsys.readouterr().err
    with OutputLock(tmp_path / "r1", enabled=False):  # ranks > 0 share rank 0's lock
        assert not (tmp_path / "r1" / LOCK_NAME).exists()


def test_second_generate_on_one_folder_is_refused_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "g"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                             "command": "generate"}))
    code, err = _cli(["generate", PIPE, "-o", out, "-n", 2, "--steps", 1, "--class", "0"], capsys)
    assert code == 1 and f"{out}: in use by generate (pid {os.getppid()}" in err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    code, err = _cli(["generate", PIPE, "-o", out, "-n", 2, "--steps", 1, "--class", "0", "--force"], capsys)
    assert code == 0 and (out / "manifest.json").exists() and not (out / LOCK_NAME).exists()


@pytest.mark.slow  # two fresh interpreters importing torch + diffusers: ~45 s on 2 shared cores
def test_two_concurrent_generates_do_not_both_run(tmp_path):
    """Two real processes on one folder: one generates, the other is refused with a message."""
    args = [sys.executable, "-m", "synthgen", "generate", str(PIPE), "-o", str(tmp_path / "g"), "-n", "2",
            "--steps", "1", "--class", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)]
    deadline = time.time() + 60
    while not (tmp_path / "g" / LOCK_NAME).exists() and procs[0].poll() is None and time.time() < deadline:
        time.sleep(0.05)
    procs.append(subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    if codes == [0, 0]:  # the first finished before the second started: nothing to coordinate
        pytest.skip("the first generate finished before the second started")
    assert codes == [0, 1], results
    refused = next(err for c, err in results if c == 1)
    assert "in use by generate" in refused and "Traceback" not in refused
    assert len(json.loads((tmp_path / "g" / "manifest.json").read_text())["items"]) == 2


def test_export_and_cache_take_the_lock(tmp_path):
    from synthgen.data.cache import build_cache
    from synthgen.export.writers import export_dataset

    (tmp_path / "src" / "images").mkdir(parents=True)
    atomic_save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "src" / "images" / "0.png")
    (tmp_path / "src" / "manifest.json").write_text(json.dumps({"items": [
        {"index": 0, "file": "images/0.png", "seed": 0, "label": 0, "condition": "class"}]}))
    (tmp_path / ".out.lock").write_text(json.dumps({"pid": 1, "host": socket.gethostname()}))
    (tmp_path / "c").mkdir()
    shutil.copy(tmp_path / ".out.lock", tmp_path / "c" / LOCK_NAME)
    with pytest.raises(LockError, match=r"\.out\.lock"):
        export_dataset(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    export_dataset(tmp_path / "src", tmp_path / "out", force=True)
    assert (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / ".out.lock").exists()
    with pytest.raises(LockError, match="in use"):
        build_cache([{"image": None}], tmp_path / "c", {"x": lambda im: im})
