"""File-backed loads (`load_model(..., mmap=True)`): variables adopt the pages of a private mapping of
the file instead of fresh copies of its bytes.

The mapping is private and copy-on-write (`MAP_PRIVATE`): a training step that updates a variable in
place gets its own copy of the pages it writes, and the file never changes. Each array handed to a
variable holds the mapping, so it stays open while any variable uses it and is unmapped with the last.
Only tensors whose bytes lie contiguous at a multiple of `ALIGNMENT` in the file can be adopted
(TensorFlow needs aligned buffers): files saved with `aligned=True`. Others are read as usual.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import time
import weakref

import numpy as np

from ._core import BadKerasZipFile, KerasSaveError, TensorFile
from .files import changed, note_mapped
from .tensors import ALIGNMENT

# verify= values of a mapped load: check the CRC before parsing (a whole read of the file), after
# returning on a background thread, or not at all.
BEFORE, BACKGROUND = True, "background"


def verify_choice(mmap_wanted, verify) -> bool | str:
    """The `verify` of a load: `mmap=True` defaults to "background"; a copying load always checks the
    CRC as it reads, so it takes only True."""
    if not isinstance(mmap_wanted, bool):
        raise TypeError(f"`mmap` must be True or False. Received: mmap={mmap_wanted!r}")
    if verify is None:
        return BACKGROUND if mmap_wanted else BEFORE
    if not (verify is True or verify is False or verify == BACKGROUND):
        raise ValueError(f"`verify` must be True, False or 'background'. Received: verify={verify!r}")
    if not mmap_wanted and verify is not BEFORE:
        raise ValueError(f"`verify={verify!r}` applies to `mmap=True` loads: a copying load checks the CRC as it reads")
    return verify


class Mapping:
    """A private, copy-on-write map of a whole file, cut into arrays at aligned offsets."""

    def __init__(self, file: TensorFile):
        size = file.size()
        # mmap of an empty file is an error; an empty file has no tensor to map anyway.
        self._map = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) if size else None
        if self._map is not None:
            note_mapped(file.fileno(), self._map)

    def array(self, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """The tensor at `offset` of the file as an array over the mapping, or None where a variable
        could not adopt it (unaligned)."""
        count = math.prod(shape)
        if self._map is None or offset % ALIGNMENT or not count or offset + count * dtype.itemsize > len(self._map):
            return None
        return np.frombuffer(self._map, dtype, count, offset).reshape(shape)


def refuse_if_replaced(path: str, fd: int, before: os.stat_result) -> None:
    """Refuses a mapped load whose file changed while it ran: written in place (pages not yet touched
    would show the new bytes) or replaced under its name (the model would not be the file's)."""
    now_named = os.stat(path)
    if changed(before, os.fstat(fd)) or (now_named.st_dev, now_named.st_ino) != (before.st_dev, before.st_ino):
        raise KerasSaveError(
            f"{path}: the file changed while it was being loaded with mmap=True (save with an atomic "
            "replace, as kerassave_fast does, and load again)"
        )


class Verification:
    """The CRC check of a mapped load, run after the model was returned (`verify="background"`)."""

    def __init__(self, path: str, model):
        self.path = path
        self._model = weakref.ref(model)
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._poison = False
        self._finished = False  # the check's result is known (`done` comes once poisoning is over)
        # Checks of earlier loads whose weights partial loads left in place (none passed when linked).
        self._earlier: list[Verification] = []

    def poison_on_failure(self) -> None:
        """If the check finds the file damaged (now or already), every floating-point variable of the
        model and its optimizer is set to NaN, so that nothing goes on silently with wrong weights."""
        for check in self._chain():
            with check._lock:
                check._poison = True
                failed = check._finished and check._error is not None
            if failed and check._current():
                _poison(check._model())

    def _current(self) -> bool:
        """Whether some of the model's weights are still those of the load this checks (no load since
        replaced them all)."""
        model = self._model()
        with _VERIFICATIONS_LOCK:
            newest = _VERIFICATIONS.get(model) if model is not None else None
        return newest is not None and self in newest._chain()

    def _finish(self, error: BaseException | None) -> None:
        with self._lock:
            self._error = error
            self._finished = True
            poison = self._poison and error is not None and self._current()
        try:
            if poison:
                _poison(self._model())
        finally:
            self._done.set()

    def _chain(self) -> list[Verification]:
        """This check and those of earlier loads whose weights a partial load left in place."""
        return [self, *self._earlier]

    def _passed(self) -> bool:
        return self._finished and self._error is None

    def done(self) -> bool:
        return all(c._done.is_set() for c in self._chain())

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for c in self._chain():
            if not c._done.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                return False
        return True

    def result(self, timeout: float | None = None) -> None:
        """Waits for the check (and those of earlier loads whose weights a partial load kept); raises
        `BadKerasZipFile` if a file's bytes are not the ones saved."""
        if not self.wait(timeout):
            raise TimeoutError(f"{self.path}: verification still running after {timeout} s")
        for c in self._chain():
            if c._error is not None:
                raise c._error


_VERIFICATIONS_LOCK = threading.Lock()
_VERIFICATIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> Verification


def verify_in_background(model, file: TensorFile, start: int, size: int, expected_crc: int, name: str) -> None:
    """Checks the CRC-32 of `size` bytes at `start` of `file` on a thread (one core: the model is
    in use meanwhile); the result is `verification(model)`."""
    check = Verification(file.path, model)

    def run() -> None:
        error = None
        try:
            if file.crc32(start, size, [], 1) != expected_crc:
                error = BadKerasZipFile(f"{file.path}: Bad CRC-32 for file '{name}' (found after a mapped load)")
        except BaseException as e:  # re-raised by result()
            error = e
        check._finish(error)

    with _VERIFICATIONS_LOCK:
        _VERIFICATIONS[model] = check
    threading.Thread(target=run, name="kerassave-verify", daemon=True).start()


def _poison(model) -> None:
    """Sets every floating-point variable of `model` (and of its optimizer) to NaN."""
    if model is None:
        return
    import tensorflow as tf

    optimizer = getattr(model, "optimizer", None)
    for variable in list(model.weights) + list(getattr(optimizer, "variables", None) or []):
        dtype = tf.as_dtype(variable.dtype)
        if dtype.is_floating:
            variable.assign(tf.cast(tf.fill(variable.shape, float("nan")), dtype))


def keep_verification(model, earlier: Verification) -> None:
    """A partial load (`skip_mismatch`, `by_name`) left some of `model`'s weights from the load
    `earlier` checks: a newer mapped load's check answers for both."""
    with _VERIFICATIONS_LOCK:
        newest = _VERIFICATIONS.get(model)
        if newest is not None and newest is not earlier and not newest._earlier:
            # (those that passed no longer speak: the chain stays as long as the checks that have not)
            newest._earlier = [c for c in earlier._chain() if not c._passed()]


def forget_verification(model, check: Verification) -> None:
    """Another load replaced every weight of `model`: `check` (its last mapped load's, unless
    that load made a newer one) no longer speaks for them."""
    with _VERIFICATIONS_LOCK:
        if _VERIFICATIONS.get(model) is check:
            del _VERIFICATIONS[model]


def verification(model) -> Verification | None:
    """The background CRC check of the mapped load that made `model` (`verify="background"`), if any."""
    with _VERIFICATIONS_LOCK:
        return _VERIFICATIONS.get(model)
