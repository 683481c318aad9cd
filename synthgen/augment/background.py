"""Fill a :class:`~synthgen.augment.SynthAugment` disk cache in a background process.

``SynthAugment.pregenerate(background=True)`` returns a :class:`BackgroundFill`: a spawned
process with its own copy of the dataset and generator (the pipeline loaded once, there) that
generates the requested synthetic items batch by batch, in the order given, into the disk cache,
while the training loop runs. DataLoader workers read the items already on disk and generate
only those still missing; the cache's writes are atomic (temporary file, then rename), so a
worker never reads half a file, and an item made by both a worker and the background process is
simply written twice. Before each batch the process skips items that appeared meanwhile.

The process is spawned (not forked: a fork of a process whose torch thread pools have run can
deadlock), so the wrapped dataset and the generator must be picklable, as for ``num_workers > 0``
under the spawn start method. It uses as many torch threads as the process that started it, so
its images are those :meth:`SynthAugment.pregenerate` would make in the foreground.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Sequence

from synthgen.errors import SynthgenError


def _fill(augment, ks: list[int], batch_size: int, threads: int, stop, conn) -> None:
    """Child process: generate items ``ks`` into the cache until done or told to stop."""
    import torch

    torch.set_num_threads(threads)  # this process's own pool: as many threads as its parent
    try:
        made = augment._fill(ks, batch_size, stop=stop.is_set)
        conn.send({"made": made, "error": None})
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send({"made": None, "error": traceback.format_exc()})
    finally:
        conn.close()


class BackgroundFill:
    """A running background fill of a SynthAugment's cache (see the module docstring).

    Use as a context manager around the training loop (leaving it stops the process after its
    current batch, and raises the process's error, if any), or call :meth:`wait` / :meth:`stop`.

    Attributes:
        keys: the synthetic item numbers it generates, in order.
        made: how many items the process generated (after :meth:`wait` or :meth:`stop`).
    """

    def __init__(self, augment, keys: Sequence[int], batch_size: int):
        import torch

        self._augment, self.keys, self.made = augment, list(keys), None
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._conn, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_fill, name="synthgen-background-fill", daemon=True,
                                 args=(augment, self.keys, batch_size, torch.get_num_threads(), self._stop, send))
        try:
            self._proc.start()
        except Exception as e:  # the dataset or generator does not pickle
            raise SynthgenError(f"pregenerate(background=True): could not start the generation process ({e}); "
                                "the wrapped dataset and the generator must be picklable") from e
        finally:
            send.close()
        self._result = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def running(self) -> bool:
        return self._proc.is_alive()

    def cached(self) -> int:
        """How many of :attr:`keys` are on disk now (made by this process or by loader workers)."""
        return sum(self._augment.cache.path(self._augment.seed, k).exists() for k in self.keys)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to finish (at most ``timeout`` seconds); returns how many items it
        generated, or None if it is still running.

        Raises:
            SynthgenError: the generation failed in the process (its traceback is in the message).
        """
        self._proc.join(timeout)
        if self._proc.is_alive():
            return None
        return self._finish()

    def stop(self, timeout: float | None = 600) -> int | None:
        """Ask the process to stop after its current batch and wait for it; returns :meth:`wait`'s value."""
        self._stop.set()
        return self.wait(timeout)

    def _finish(self) -> int:
        if self._result is None:
            try:
                self._result = self._conn.recv() if self._conn.poll() else None
            except EOFError:
                self._result = None
            if self._result is None:
                self._result = {"made": None, "error": f"the generation process ended without a result "
                                                       f"(exit code {self._proc.exitcode})"}
            self.made = self._result["made"]
        if self._result["error"]:
            raise SynthgenError(f"pregenerate(background=True) failed:\n{self._result['error']}")
        return self.made

    def __enter__(self) -> BackgroundFill:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # leave quickly; the error in flight is the one to see
            self._stop.set()
            self._proc.join(60)
            if self._proc.is_alive():
                self._proc.terminate()
            return
        self.stop()
