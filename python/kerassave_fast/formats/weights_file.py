"""Keras 3 weights-only files: `.weights.h5` on its own, a sharded `.weights.json`, or the weights
inside a `.keras` zip."""

from __future__ import annotations

import contextlib
import functools
import json
import os

from ..asynchronous import Write
from ..files import atomic_replace
from ..keras3 import state
from . import sharded_weights
from .keras_zip import KerasArchive
from .weights_h5 import Compression, read_ahead, read_weights, write_plan, write_replayed, write_weights_file


def _require_built(model, doing: str) -> None:
    if not model.built:  # stock's save_weights_only / load_weights_only
        raise ValueError(
            f"You are {doing} a model that has not yet been built. Try building the model first by "
            "calling it on some data or by using `build()`."
        )


def prepare_save(
    model,
    filepath: str,
    threads: int = 0,
    compression: Compression | None = None,
    alignment: int = 1,
    blocking: bool = False,
) -> Write:
    """`model.save_weights(filepath)` for a `.weights.h5` path, in two halves: this one snapshots the
    variables now and returns the second, which writes the file, replacing any old one only when complete.
    `blocking`: the second half runs at once, on this thread; a model whose walk is remembered then
    has each snapshot written as soon as it is taken (see `keras_zip.prepare_save`)."""
    _require_built(model, "saving")
    replay = state.replay_walk(model, with_assets=False) if blocking and compression is None else None
    if replay is not None and replay.speculative:
        return functools.partial(_write_replayed, model, replay, filepath, threads, alignment)
    plan, _ = state.plan_model_state(model, with_assets=False)
    return functools.partial(write_plan, plan, filepath, threads, compression, alignment)


def _write_replayed(model, replay: state.Replay, filepath: str, threads: int, alignment: int) -> None:
    with atomic_replace(filepath) as destination:
        if not write_replayed(destination.file, replay, threads, alignment):  # walk, and write it all again
            os.ftruncate(destination.file.fileno(), 0)
            plan, _ = state.plan_model_state(model, with_assets=False)
            write_weights_file(destination, plan, threads, None, alignment)


def prepare_sharded_save(
    model, filepath: str, max_shard_size, threads: int = 0, compression: Compression | None = None, alignment: int = 1
) -> Write:
    """`model.save_weights(filepath, max_shard_size=...)` for a `.weights.json` path, as `prepare_save`:
    shards cut where stock cuts them (a tensor larger than a shard is refused before anything is written)."""
    _require_built(model, "saving")
    plan, _ = state.plan_model_state(model, with_assets=False)
    max_shard_bytes = float(max_shard_size) * 1024**3  # stock's arithmetic (GB, to bytes)
    sharded = sharded_weights.split(plan, filepath, max_shard_bytes, state.shard_size, state.larger_than_a_shard)
    return functools.partial(sharded_weights.write, sharded, filepath, threads, compression, alignment)


def _load_sharded(model, filepath: str, skip_mismatch: bool, threads: int, mmap: bool) -> bool:
    """A `.weights.json` and its shards; False, having done nothing, for a map or shards stock
    should answer for (unreadable, not stock's shape, naming a shard that is not there)."""
    try:
        with open(filepath, "rb") as f:
            names = sharded_weights.files_to_open(filepath, json.loads(f.read()))
    except (OSError, ValueError):
        return False
    directory = os.path.dirname(filepath)
    if names is None or not all(os.path.isfile(os.path.join(directory, n)) for n in names):
        return False
    with contextlib.ExitStack() as stack:
        try:
            opened = {n: stack.enter_context(read_ahead(os.path.join(directory, n), threads, mmap)) for n in names}
        except OSError:  # one libhdf5 cannot open: stock warns (skip_mismatch), raises, or never opens it
            return False
        shards = {n: (o.h5, o.tensors) for n, o in opened.items()}
        state.load_sharded_state(state.BuiltModel(model), filepath, shards, skip_mismatch=skip_mismatch)
    return True


def load(model, filepath: str, skip_mismatch: bool = False, threads: int = 0, mmap: bool = False, verify=True) -> bool:
    """`model.load_weights(filepath)` for a `.weights.h5`, `.weights.json` or `.keras` path. Returns
    False, having done nothing, for a `.keras` whose members are compressed in ways not read here
    (and a sharded map stock should answer for). `mmap` and `verify` as for `keras_zip.load` (a
    `.weights.h5` has no checksum to verify)."""
    _require_built(model, "loading weights into")
    if filepath.endswith(".weights.json"):
        return _load_sharded(model, filepath, skip_mismatch, threads, mmap)
    if filepath.endswith(".keras"):
        archive = KerasArchive(filepath)
        if not archive.weights_readable_here:
            return False
        with archive.open_weights(threads, check_first=mmap and verify is True) as weights:
            mapping = archive.mapping(weights, mmap)
            reading = read_weights(
                weights.h5, weights.source, weights.start, weights.size, filepath, threads, mapping, weights.listed
            )
            arrays = archive.checked_arrays(weights, reading, mapped=mapping is not None)
            state.load_model_state(state.BuiltModel(model), weights.h5, arrays, None, skip_mismatch=skip_mismatch)
        if mapping is not None:
            archive.end_mapped_load(model, weights, verify)
        return True
    with read_ahead(filepath, threads, mmap) as opened:
        state.load_model_state(state.BuiltModel(model), opened.h5, opened.tensors, None, skip_mismatch=skip_mismatch)
    return True
