"""Compressed weights files (`compression=`, `checksum=`), ours on 1 and 2 threads against h5py
compressing the same tensors (`compression="gzip", compression_opts=1, shuffle=True`, h5py's own
chunks), per dtype: time, raw MB/s, file size and the extra RSS while saving. Medians of repeats
interleaved in a shuffled order, all in one run; writes benches/results/compression.md.

    python benches/compression.py [--units 2048] [--repeats 3] [--dir /dev/shm]
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import sys
import time
from pathlib import Path

import h5py
import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import kerassave_fast as ksf
import measure
import report


def model_of(units: int, dtype: str) -> keras.Model:
    """4 x Dense(units) + Adam after one step, its variables in `dtype`."""
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(units, dtype=dtype) for _ in range(4)]
    model = keras.Sequential([keras.Input((units,)), *layers])
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(size=(8, units)).astype("float32")
    model.train_on_batch(x, x)
    return model


def h5py_gzip(arrays: list[np.ndarray], path: str) -> None:
    """What a user gets from h5py today: each tensor compressed on one thread, h5py's chunks."""
    with h5py.File(path, "w") as f:
        for i, a in enumerate(arrays):
            if a.ndim:
                f.create_dataset(str(i), data=a, compression="gzip", compression_opts=1, shuffle=True)
            else:
                f.create_dataset(str(i), data=a)


def timed_cpu(call, cpu: list[float]) -> float:
    """Seconds `call()` took; the CPU seconds the whole process spent meanwhile (every thread,
    user + system) go to `cpu`: how many of the cores a save kept busy."""
    before, start = time.process_time(), time.perf_counter()
    call()
    elapsed, after = time.perf_counter() - start, time.process_time()
    cpu.append(after - before)
    return elapsed


def busy(cpu: list[float], seconds: float) -> str:
    used = statistics.median(cpu)
    return f"{used:.3f} ({used / seconds:.2f})"


def compressor_alone(arrays: list[np.ndarray], repeats: int, raw: int) -> dict[tuple[str, int], float]:
    """Medians of the Rust core's compression alone (shuffle + codec at level 1 on the tensors'
    1 MiB chunks, 16 per call as a save hands them over, each call's results dropped: no file, no
    HDF5) on 1 and 2 threads, interleaved: how far the compressor itself scales beside the saves above."""
    from kerassave_fast._core import hdf5_encode_chunks
    from kerassave_fast.formats.weights_h5 import Compression

    by_itemsize: dict[int, list[np.ndarray]] = {}
    for a in arrays:
        if a.ndim:
            flat = a.reshape(-1).view(np.uint8)
            by_itemsize.setdefault(a.dtype.itemsize, []).extend(
                flat[i : i + (1 << 20)] for i in range(0, flat.nbytes, 1 << 20)
            )

    def op(codec: str, threads: int):
        filters = Compression.from_arguments(codec, 1).filters

        def compress() -> None:
            for itemsize, chunks in by_itemsize.items():
                for i in range(0, len(chunks), 16):
                    hdf5_encode_chunks(chunks[i : i + 16], filters, 1, itemsize, threads)

        return lambda: measure.timed(compress)

    cases = [(codec, threads) for codec in ("gzip", "zstd") for threads in (1, 2)]
    samples = measure.interleaved({f"{c}|{t}": op(c, t) for c, t in cases}, repeats, backed=measure.backed_for(raw))
    return {(c, t): statistics.median(samples[f"{c}|{t}"]) for c, t in cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/dev/shm")
    args = parser.parse_args()
    info = report.machine([args.dir])
    lines = [
        f"{report.machine_line(info)}. "
        f"{info['date']}. "
        f"Medians of {args.repeats} repeats, interleaved in a shuffled order, all in one run; `{args.dir}`. "
        + report.BACKED,
        "",
        "| dtype | what | threads | save s | CPU s (cores busy) | raw MB/s | ×1 thread | vs h5py gzip-1 | "
        "load s | file MB | of raw | extra RSS MiB |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    alone: dict[str, tuple[dict[tuple[str, int], float], int]] = {}
    for dtype in ("float32", "bfloat16"):
        model = model_of(args.units, dtype)
        arrays = measure.model_arrays(model)
        raw = sum(a.nbytes for a in arrays)
        fresh = keras.models.clone_model(model)
        fresh.compile(optimizer="adam", loss="mse")
        fresh.optimizer.build(fresh.trainable_variables)
        cases = {
            ("stored (ours)", 2): {},
            ("gzip-1", 1): {"compression": "gzip", "compression_level": 1},
            ("gzip-1", 2): {"compression": "gzip", "compression_level": 1},
            ("zstd-3", 1): {"compression": "zstd", "compression_level": 3},
            ("zstd-3", 2): {"compression": "zstd", "compression_level": 3},
            ("zstd-1", 1): {"compression": "zstd", "compression_level": 1},
            ("gzip-1 + checksum", 2): {"compression": "gzip", "compression_level": 1, "checksum": True},
        }
        path = {case: os.path.join(args.dir, f"ksf-compression-{i}.weights.h5") for i, case in enumerate(cases)}
        h5py_path = os.path.join(args.dir, "ksf-compression-h5py.h5")
        saves = {case: [] for case in cases} | {"h5py": []}
        cpu = {case: [] for case in cases} | {"h5py": []}  # the process's user + system seconds while saving
        loads = {case: [] for case in cases}
        rss: dict = {}
        order = [(c, k) for c in [*cases, "h5py"] for k in ("save", "load") if not (c == "h5py" and k == "load")]
        for _ in range(args.repeats):
            random.shuffle(order)
            for case, kind in order:
                measure.back_memory(measure.backed_for(raw))
                if case == "h5py":
                    saves["h5py"].append(timed_cpu(functools.partial(h5py_gzip, arrays, h5py_path), cpu["h5py"]))
                    continue
                settings, threads = cases[case], case[1]
                if kind == "save" or not os.path.exists(path[case]):
                    save = functools.partial(ksf.save_weights, model, path[case], threads=threads, **settings)
                    saves[case].append(timed_cpu(save, cpu[case]))
                else:
                    start = time.perf_counter()
                    ksf.load_weights(fresh, path[case], threads=threads)
                    loads[case].append(time.perf_counter() - start)
        for case, settings in cases.items():
            save = functools.partial(ksf.save_weights, model, path[case], threads=case[1], **settings)
            rss[case] = measure.extra_peak_rss(save)
        rss["h5py"] = measure.extra_peak_rss(functools.partial(h5py_gzip, arrays, h5py_path))
        h5py_s = statistics.median(saves["h5py"])
        for case in cases:
            save_s = statistics.median(saves[case])
            one = statistics.median(saves[(case[0], 1)]) if (case[0], 1) in cases else None
            size = os.path.getsize(path[case])
            speedup = f"{one / save_s:.2f}×" if one else "--"
            load_s = statistics.median(loads[case])
            lines.append(
                f"| {dtype} | {case[0]} | {case[1]} | {save_s:.3f} | {busy(cpu[case], save_s)} | "
                f"{raw / save_s / 1e6:.0f} | {speedup} | "
                f"{h5py_s / save_s:.1f}× | {load_s:.3f} | {size / 1e6:.1f} | {size / raw:.3f} | "
                f"{rss[case] / 2**20:.0f} |"
            )
        size = os.path.getsize(h5py_path)
        lines.append(
            f"| {dtype} | h5py gzip-1 + shuffle | 1 | {h5py_s:.3f} | {busy(cpu['h5py'], h5py_s)} | "
            f"{raw / h5py_s / 1e6:.0f} | -- | 1.0× | -- | "
            f"{size / 1e6:.1f} | {size / raw:.3f} | {rss['h5py'] / 2**20:.0f} |"
        )
        for p in [*path.values(), h5py_path]:
            os.unlink(p)
        alone[dtype] = (compressor_alone(arrays, args.repeats, raw), raw)
    lines += [
        "",
        "The compressor alone: the Rust core's shuffle + codec at level 1 over the same tensors' 1 MiB chunks, "
        "16 per call as a save hands them over, each call's results dropped (no file, no HDF5), medians of the "
        "same number of interleaved repeats:",
        "",
        "| dtype | codec | threads | s | raw MB/s | ×1 thread |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for dtype, (times, raw) in alone.items():
        for (codec, threads), t in times.items():
            lines.append(
                f"| {dtype} | {codec}-1 | {threads} | {t:.3f} | {raw / t / 1e6:.0f} | {times[(codec, 1)] / t:.2f}× |"
            )
    lines += [
        "",
        f"Model: 4 × Dense({args.units}) + Adam after one step (weights and both moments), per dtype. "
        "Raw MB/s: the tensors' bytes over the save time. CPU s: the process's user + system time while "
        "saving, every thread (median), and that over the save time: how many cores the save kept busy. "
        "With `threads=1` one thread compresses while the calling thread hands HDF5 what it compressed and "
        "HDF5 writes it, so a save on 1 thread may keep more than one core busy. "
        "Load: `load_weights` into a built model.",
        report.versions_line(info),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "compression.md"
    out.write_text(text)


if __name__ == "__main__":
    main()
