"""Keras 3 weights-only files: `.weights.h5` on its own, or the weights inside a `.keras` zip."""

from __future__ import annotations

import functools

from ..asynchronous import Write
from ..keras3 import state
from .keras_zip import KerasArchive
from .weights_h5 import Compression, read_ahead, read_weights, write_plan


def _require_built(model, doing: str) -> None:
    if not model.built:  # stock's save_weights_only / load_weights_only
        raise ValueError(
            f"You are {doing} a model that has not yet been built. Try building the model first by "
            "calling it on some data or by using `build()`."
        )


def prepare_save(
    model, filepath: str, threads: int = 0, compression: Compression | None = None, alignment: int = 1
) -> Write:
    """`model.save_weights(filepath)` for a `.weights.h5` path, in two halves: this one snapshots the
    variables now and returns the second, which writes the file, replacing any old one only when complete."""
    _require_built(model, "saving")
    plan, _ = state.plan_model_state(model, with_assets=False)
    return functools.partial(write_plan, plan, filepath, threads, compression, alignment)


def load(model, filepath: str, skip_mismatch: bool = False, threads: int = 0, mmap: bool = False, verify=True) -> bool:
    """`model.load_weights(filepath)` for a `.weights.h5` or `.keras` path. Returns False, having
    done nothing, for a `.keras` whose members are compressed in ways not read here. `mmap` and
    `verify` as for `keras_zip.load` (a `.weights.h5` has no checksum to verify)."""
    _require_built(model, "loading weights into")
    if filepath.endswith(".keras"):
        archive = KerasArchive(filepath)
        if not archive.readable_here:
            return False
        with archive.open_weights(threads, check_first=mmap and verify is True) as weights:
            mapping = archive.mapping(weights, mmap)
            reading = read_weights(weights.h5, weights.source, weights.start, weights.size, filepath, threads, mapping)
            arrays = archive.checked_arrays(weights, reading, mapped=mapping is not None)
            state.load_model_state(state.BuiltModel(model), weights.h5, arrays, None, skip_mismatch=skip_mismatch)
        if mapping is not None:
            archive.end_mapped_load(model, weights, verify)
        return True
    with read_ahead(filepath, threads, mmap) as opened:
        state.load_model_state(state.BuiltModel(model), opened.h5, opened.tensors, None, skip_mismatch=skip_mismatch)
    return True
