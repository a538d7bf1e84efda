"""A progress bar in bytes for saves and loads that take over a second (`progress=`).

The Rust core counts the tensor bytes it moves (written, read, compressed or decompressed); a
thread polls that count while the save or load runs. The count is the process's: two saves or
loads running at once on different threads advance each other's bars.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator

from ._core import tensor_bytes_moved

_POLL_SECONDS = 0.1
_SHOW_AFTER_SECONDS = 1.0


def wanted(progress) -> bool:
    """`progress=True`/`False` decides; None (the default): a bar when stderr is a terminal and
    not in CI (the `CI` environment variable that CI services set)."""
    if progress is not None and not isinstance(progress, bool):
        raise ValueError(f"`progress` must be True, False or None. Received: progress={progress!r}")
    if progress is not None:
        return progress
    return sys.stderr.isatty() and not os.environ.get("CI")


@contextlib.contextmanager
def bar(total: int, description: str, show: bool) -> Iterator[None]:
    """Shows a bar of `total` bytes (after a second, if still running) while the block runs."""
    if not show:
        yield
        return
    from tqdm import tqdm

    start = tensor_bytes_moved()
    shown = tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        delay=_SHOW_AFTER_SECONDS,
        leave=False,
        file=sys.stderr,
    )
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(_POLL_SECONDS):
            shown.update(min(total, tensor_bytes_moved() - start) - shown.n)

    poller = threading.Thread(target=poll, name="kerassave_fast progress", daemon=True)
    poller.start()
    try:
        yield
        stop.set()
        poller.join()
        shown.update(total - shown.n)  # done: a load reads a little less than the file (its metadata)
    finally:
        stop.set()
        poller.join()
        shown.close()


def around(write: Callable[[], None], total: int, description: str) -> Callable[[], None]:
    """`write` with a bar shown while it runs (a background save's write)."""

    def shown() -> None:
        with bar(total, description, True):
            write()

    return shown


def model_bytes(model) -> int:
    """The bytes of a model's variables and its optimizer's: what a save writes, near enough."""
    import tensorflow as tf

    slots = getattr(getattr(model, "optimizer", None), "variables", [])
    variables = list(model.weights) + list(slots() if callable(slots) else slots)  # tf_keras' OptimizerV2: a method
    return sum(math.prod(v.shape) * tf.as_dtype(v.dtype).size for v in variables)


def path_bytes(path) -> int:
    """The bytes of a file, or of every file under a directory (a SavedModel)."""
    try:
        if os.path.isdir(path):
            return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
        return os.path.getsize(path)
    except (OSError, TypeError):
        return 0
