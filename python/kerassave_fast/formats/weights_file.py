"""Keras 3 weights-only files: `.weights.h5` on its own, or the weights inside a `.keras` zip."""

from __future__ import annotations

import h5py

from .._core import TensorFile
from ..files import FileRegion, atomic_replace
from ..keras3 import state
from .keras_zip import KerasArchive
from .weights_h5 import read_weights, write_weights_file


def _require_built(model, doing: str) -> None:
    if not model.built:  # stock's save_weights_only / load_weights_only
        raise ValueError(
            f"You are {doing} a model that has not yet been built. Try building the model first by "
            "calling it on some data or by using `build()`."
        )


def save(model, filepath: str, threads: int = 0) -> None:
    """`model.save_weights(filepath)` for a `.weights.h5` path, replacing any old file only when complete."""
    _require_built(model, "saving")
    plan, _ = state.plan_model_state(model, with_assets=False)
    with atomic_replace(filepath) as tmp_path:
        file = TensorFile(tmp_path, writable=True)
        write_weights_file(file, plan, threads)
        del file


def load(model, filepath: str, skip_mismatch: bool = False, threads: int = 0) -> None:
    """`model.load_weights(filepath)` for a `.weights.h5` or `.keras` path."""
    _require_built(model, "loading weights into")
    if filepath.endswith(".keras"):
        archive = KerasArchive(filepath)
        with archive.open_weights(threads) as (source, start, size, h5):
            arrays = archive.checked_arrays(read_weights(h5, source, start, size, filepath, threads), threads)
            state.load_model_state(state.BuiltModel(model), h5, arrays, None, skip_mismatch=skip_mismatch)
        return
    file = TensorFile(filepath)
    size = file.size()
    with h5py.File(FileRegion(file.fileno(), 0, size), "r") as h5:
        arrays = read_weights(h5, file, 0, size, filepath, threads).result().arrays
        state.load_model_state(state.BuiltModel(model), h5, arrays, None, skip_mismatch=skip_mismatch)
