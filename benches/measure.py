"""What the benchmark measures, all in one process and one run: the floor (raw I/O of the same
bytes, the stock build from config), stock Keras, and us. Times are medians of repeats."""

from __future__ import annotations

import gc
import json
import os
import random
import statistics
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
from keras.src.saving import saving_lib

import kerassave_fast as ksf
from kerassave_fast.formats import keras_zip, sharded_weights, weights_h5
from kerassave_fast.keras3 import state
from kerassave_fast.tensors import snapshot


def _status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def extra_peak_rss(action: Callable[[], object]) -> int:
    """Bytes the process's resident set grew to, above where it stood, while `action` ran."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    before = _status("VmRSS")
    result = action()
    peak = _status("VmHWM")
    del result
    return max(0, peak - before)


def read_so_far() -> int:
    """Bytes this process has read with read calls, from every file (`/proc/self/io`'s rchar;
    mapped pages do not count)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


# The most memory a call is made ready for (see back_memory).
_MAX_BACKED = 4 << 30


def back_memory(nbytes: int) -> None:
    """Touches and frees `nbytes` (at most 4 GiB) of fresh memory, untimed, right before a timed call.

    This VM hands the memory its guest frees back to the host within seconds (free page reporting)
    and faulting it in again costs several times a first touch, so whichever call first allocated
    after a pause paid it at random. The pages
    touched and freed here serve the call's allocations (new file pages, loaded buffers) instead,
    as on a machine that owns its memory; stock, ours and the raw I/O get the same."""
    if nbytes > 0:
        np.ones(min(nbytes, _MAX_BACKED), np.uint8)


def backed_for(nbytes: int) -> int:
    """What a call saving or loading `nbytes` of tensors may allocate fresh: stock's save holds a
    copy of the tensors while it writes a new file of them."""
    return 2 * nbytes + (64 << 20)


def timed(call: Callable[[], object]) -> float:
    """Seconds `call()` took; what it returns is dropped after the clock stops (freeing a loaded
    buffer is not part of the call)."""
    start = time.perf_counter()
    kept = call()
    elapsed = time.perf_counter() - start
    del kept
    return elapsed


def interleaved(
    ops: dict[str, Callable[[], float]],
    repeats: int,
    each_repeat: Callable[[int], None] = lambda rep: None,
    warmed: Callable[[], None] = lambda: None,
    backed: int = 0,
) -> dict[str, list[float]]:
    """Each op's samples (it returns its own time): a warm-up call of each (then `warmed()`), then
    `repeats` rounds, reshuffled each round so that a noisy moment, or whatever follows a big free,
    hits every op in turn; a full collection before each call (a loaded model is a reference cycle:
    its gigabytes go only when collected) and `backed` bytes of memory made ready (`back_memory`)."""
    for op in ops.values():  # warm-up: first calls trace functions and fill caches
        op()
        gc.collect()
    warmed()
    samples: dict[str, list[float]] = {name: [] for name in ops}
    order = list(ops)
    for rep in range(repeats):
        random.Random(rep).shuffle(order)
        for name in order:
            gc.collect()
            back_memory(backed)
            samples[name].append(ops[name]())
        each_repeat(rep)
    return samples


def paired(a: Callable[[], float], b: Callable[[], float], pairs: int, backed: int = 0) -> list[tuple[float, float]]:
    """(a's time, b's time) of `pairs` back-to-back runs, a first in even pairs and b first in odd
    ones (after a warm-up call of each), a full collection and `backed` bytes of memory made ready
    before each call: the ratio within a pair compares two calls under the same machine state."""
    a()
    b()
    result = []
    for i in range(pairs):
        gc.collect()
        back_memory(backed)
        first = a() if i % 2 == 0 else b()
        gc.collect()
        back_memory(backed)
        second = b() if i % 2 == 0 else a()
        result.append((first, second) if i % 2 == 0 else (second, first))
    return result


def model_arrays(model) -> list[np.ndarray]:
    """The bytes a save writes: every weight and optimizer variable (views, no copies)."""
    variables = list(model.weights) + list(model.optimizer.variables)
    return [snapshot(v) for v in variables]


def raw_write(arrays: list[np.ndarray], path: str) -> None:
    """The save floor: one thread writing the same bytes to a new file, sequentially."""
    with open(path, "wb") as f:
        for a in arrays:
            f.write(a.reshape(-1).view(np.uint8))


def on_threads(total: int, threads: int, share: Callable[[int, int], None]) -> None:
    """Runs `share(begin, end)` on `threads` threads, each its contiguous share of `total` bytes;
    raises what a share raised (a share cut short must not pass for a fast one)."""
    errors: list[BaseException] = []

    def run(begin: int, end: int) -> None:
        try:
            share(begin, end)
        except BaseException as e:
            errors.append(e)

    workers = [
        threading.Thread(target=run, args=(total * i // threads, total * (i + 1) // threads)) for i in range(threads)
    ]
    try:
        for w in workers:
            w.start()
    finally:  # also when interrupted: the caller closes the file they use once this returns
        for w in workers:
            if w.ident is not None:
                w.join()
    if errors:
        raise errors[0]


def raw_write_threads(arrays: list[np.ndarray], path: str, threads: int = 2) -> None:
    """The same bytes written to a new file by `threads` threads, each its contiguous share, 16 MiB
    per `pwrite`: how fast this machine takes them from several cores (what a parallel writer can hope for)."""
    views = [a.reshape(-1).view(np.uint8) for a in arrays]
    starts = np.cumsum([0] + [v.nbytes for v in views]).tolist()

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:

        def write_share(begin: int, end: int) -> None:
            for view, start in zip(views, starts, strict=False):
                lo, hi = max(begin, start), min(end, start + view.nbytes)
                for at in range(lo, hi, 16 << 20):
                    os.pwrite(fd, view[at - start : min(hi, at + (16 << 20)) - start], at)

        on_threads(starts[-1], threads, write_share)
    finally:
        os.close(fd)


def raw_read_threads(path: str, threads: int = 2) -> None:
    """Every byte of the file read by `threads` threads, each its contiguous share into one reused
    1 MiB buffer, nothing kept: what any check of every byte must at least do (short of mapping the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:

        def read_share(begin: int, end: int) -> None:
            buffer = np.empty(1 << 20, np.uint8)
            at = begin
            while at < end:
                n = os.preadv(fd, [buffer[: min(end - at, len(buffer))]], at)
                if n == 0:
                    raise EOFError(f"{path}: shorter than {end} bytes")
                at += n

        on_threads(os.fstat(fd).st_size, threads, read_share)
    finally:
        os.close(fd)


def raw_write_atomic(arrays: list[np.ndarray], path: str) -> None:
    """The same write to a new file renamed over the old one, as an atomic save must do: the new
    file needs fresh pages while the old one still holds its own (raw_write recycles them)."""
    tmp = path + ".tmp"
    raw_write(arrays, tmp)
    os.replace(tmp, path)


def save_first(save: Callable[[object, str], object], model, path: str) -> None:
    """Our save without the HDF5 layout remembered from an earlier save of the same architecture."""
    weights_h5._LAYOUTS.clear()
    save(model, path)


def save_cold(save: Callable[[object, str], object], model, path: str) -> None:
    """Our save of a model as if never saved in this process: stock's walk of the model, its config,
    the HDF5 layout and where the weights start in the zip, nothing remembered from earlier saves
    (a one-off `model.save`, or a training run's first checkpoint)."""
    weights_h5._LAYOUTS.clear()
    state._WALKS.clear()
    keras_zip._STARTS.clear()
    save(model, path)


def raw_read(path: str) -> np.ndarray:
    """The load floor's I/O: one thread reading the file into fresh memory, 16 MiB at a time
    (a single 800 MB `readinto` is up to 5x slower here, so the floor uses the faster way)."""
    buffer = np.empty(os.path.getsize(path), np.uint8)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(buffer):
            done += f.readinto(view[done : done + (16 << 20)])
    return buffer


def stock_build(path: str):
    """The load floor's rest: stock building the model from its config (initializers run)."""
    with zipfile.ZipFile(path) as zf:
        config = zf.read("config.json")
    return saving_lib._model_from_config(config, None, True, True)


@dataclass(frozen=True)
class Format:
    """A container and the flavour of the model saved in it: what stock calls to save and load
    it, what we call, and how the floor's build makes the model from its config."""

    name: str
    suffix: str
    stock_save: Callable[[object, str], object]
    stock_load: Callable[[str], object]
    ours_load: Callable[[str], object]
    build: Callable[[object, str], object]  # (model, our file) -> the model built from its config
    ours_save: Callable[..., object] = ksf.save_model  # (model, path, **our keywords)
    files: Callable[[str], list[str]] = lambda path: [path]  # every file a save at `path` writes


KERAS = Format(
    "keras", ".keras", keras.saving.save_model, keras.saving.load_model, ksf.load_model, lambda _, p: stock_build(p)
)
# Keras 3's legacy `.h5`; note that stock's load leaves the optimizer unbuilt (its state dropped).
H5 = Format(
    "h5",
    ".h5",
    keras.saving.save_model,
    keras.saving.load_model,
    ksf.load_model,
    lambda model, _: keras.models.model_from_json(model.to_json()),
)


def weights_only(model, max_shard_size: float | None = None) -> Format:
    """Keras 3 weights only: a `.weights.h5` (`save_weights(...)`), or with `max_shard_size` (GB)
    a `.weights.json` and its shards; loads go into a copy of the model built beforehand (the
    floor's build is 0)."""
    target = keras.models.clone_model(model)
    target.compile(optimizer=type(model.optimizer).from_config(model.optimizer.get_config()), loss="mse")
    target.optimizer.build(target.trainable_variables)
    options = {} if max_shard_size is None else {"max_shard_size": max_shard_size}

    def files(path: str) -> list[str]:
        if max_shard_size is None:
            return [path]
        directory, base = os.path.dirname(path), sharded_weights.base_name(path)
        shards = sorted(n for n in os.listdir(directory) if n.startswith(f"{base}_") and n.endswith(".weights.h5"))
        return [path] + [os.path.join(directory, n) for n in shards]

    return Format(
        "weights" if max_shard_size is None else f"sharded {max_shard_size:g} GB",
        ".weights.h5" if max_shard_size is None else ".weights.json",
        lambda m, p: keras.saving.save_weights(m, p, **options),
        lambda p: keras.saving.load_weights(target, p),
        lambda p: ksf.load_weights(target, p),
        lambda _m, _p: None,
        lambda m, p, **kw: ksf.save_weights(m, p, **options, **kw),
        files,
    )


def tf_keras_h5() -> Format:
    return tf_keras_format(".h5")


def tf_keras_keras() -> Format:
    """tf_keras' own v3 zip."""
    return tf_keras_format(".keras")


def tf_keras_format(suffix: str) -> Format:
    import tf_keras

    return Format(
        f"tf_keras {suffix[1:]}",
        suffix,
        tf_keras.models.save_model,
        tf_keras.models.load_model,
        lambda p: ksf.load_model_as("tf_keras", p),
        lambda model, _: tf_keras.models.model_from_json(model.to_json()),
    )


@dataclass
class Result:
    """Medians (seconds) and single values of one model in one directory."""

    model: str
    directory: str
    nbytes: int
    variables: int
    format: str = "keras"
    times: dict[str, float] = field(default_factory=dict)
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)  # every timed call, in the order run
    extra_rss: dict[str, int] = field(default_factory=dict)
    file_size: dict[str, int] = field(default_factory=dict)
    bytes_read: dict[str, int] = field(default_factory=dict)  # by each call `extra_rss` measured

    def ratio(self, op: str, floor: str) -> float:
        return self.times[op] / self.floor(floor)

    def read_ratio(self, who: str) -> float:
        """Bytes `who`'s (stock's, ours) load read over the size of the files it loaded."""
        return self.bytes_read[f"{who}_load"] / self.file_size[who]

    def floor(self, name: str) -> float:
        if name == "read+build":
            return self.times["raw_read"] + self.times["stock_build"]
        return self.times[name]

    def to_json(self) -> dict:
        return self.__dict__


def run(
    model_name: str, model, directory: str, repeats: int, log: Callable[[str], None], fmt: Format = KERAS
) -> Result:
    arrays = model_arrays(model)
    result = Result(model_name, directory, sum(a.nbytes for a in arrays), len(arrays), fmt.name)
    paths = {n: os.path.join(directory, f"ksf-bench-{model_name}-{n}") for n in ("raw", "raw_atomic", "stock", "ours")}
    paths["stock"] += fmt.suffix
    paths["ours"] += fmt.suffix
    ops: dict[str, Callable[[], object]] = {
        "raw_write": lambda: raw_write(arrays, paths["raw"]),
        "raw_write_atomic": lambda: raw_write_atomic(arrays, paths["raw_atomic"]),
        "stock_save": lambda: fmt.stock_save(model, paths["stock"]),
        "ours_save": lambda: fmt.ours_save(model, paths["ours"]),
        "ours_save_first": lambda: save_first(fmt.ours_save, model, paths["ours"]),
        "ours_save_cold": lambda: save_cold(fmt.ours_save, model, paths["ours"]),
        "ours_save_fsync": lambda: fmt.ours_save(model, paths["ours"], fsync=True),
        "raw_read": lambda: raw_read(paths["raw"]),
        "stock_build": lambda: fmt.build(model, paths["ours"]),
        "stock_load": lambda: fmt.stock_load(paths["stock"]),
        "ours_load": lambda: fmt.ours_load(paths["ours"]),
    }
    try:
        samples = interleaved(
            {name: lambda op=op: timed(op) for name, op in ops.items()},
            repeats,
            lambda rep: log(f"  {model_name} in {directory}: repeat {rep + 1}/{repeats} done"),
            backed=backed_for(result.nbytes),
        )
        result.samples = samples
        for name, values in samples.items():
            result.times[name] = statistics.median(values)
            result.spread[name] = (min(values), max(values))
        for name in ("stock_save", "ours_save", "stock_load", "ours_load"):
            before = read_so_far()  # a load's bytes read, counted over the same call (a few KiB of /proc too)
            result.extra_rss[name] = extra_peak_rss(ops[name])
            result.bytes_read[name] = read_so_far() - before
        result.file_size = {n: sum(map(os.path.getsize, fmt.files(paths[n]))) for n in ("stock", "ours")}
    finally:
        for path in paths.values():
            for file in fmt.files(path) if os.path.exists(path) else []:
                os.unlink(file)
    return result


def save_json(results: list[Result], machine: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine, "results": [r.to_json() for r in results]}, f, indent=1)
