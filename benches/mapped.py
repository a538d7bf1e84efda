"""File-backed loads (`load_model(..., mmap=True)`) of an aligned `.keras` against a copying load, a
raw read of the file and the model build alone, all in one run. Writes benches/results/mapped.md.

    python benches/mapped.py [--units 8192] [--repeats 5] [--dirs /dev/shm,benches/scratch]

Model: 4 x Dense(units) + Adam after one training step (8192: 3.2 GB), saved with `aligned=True`.
Per directory, each repeat runs in a shuffled order: a raw read of the file; stock building the
model from its config (initializers run: the floor's build); our copying load; mapped loads with
`verify="background"` (the default; timed until the model is returned, the check then awaited
untimed) and with `verify=False`. Then, once, each in a new process: the anonymous memory a load
adds (RssAnon, which leaves out the file's pages in the page cache) and what it holds after one
training step; that
predictions and the next training step are bitwise a copying load's, and the file unchanged.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import kerassave_fast as ksf
import measure
import report
from report import shown
from run import dense_model

MIB = 1 << 20


def _digest(path: str) -> bytes:
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.digest()


_ANONYMOUS = """
import sys, numpy as np, keras, tensorflow, kerassave_fast as ksf
from kerassave_fast.formats import keras_zip  # imports counted before, not in the load
def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
before = anon()
mapped = sys.argv[2] == "mapped"
model = ksf.load_model(sys.argv[1], mmap=True, verify=False) if mapped else ksf.load_model(sys.argv[1])
loaded = anon() - before
batch = np.ones((8, model.inputs[0].shape[-1]), "float32")
model.train_on_batch(batch, batch)
print(loaded, anon() - before)
"""


def _anonymous_added(path: str, how: str) -> tuple[int, int]:
    """RssAnon a fresh process holds after loading `path` ("copying" or "mapped") and after one
    training step: in a process of its own, so no memory freed by earlier loads is reused."""
    out = subprocess.run([sys.executable, "-c", _ANONYMOUS, path, how], capture_output=True, text=True, check=True)
    loaded, trained = (int(v) for v in out.stdout.split()[-2:])
    return max(0, loaded), max(0, trained)


def _same_as_a_copying_load(path: str, units: int) -> bool:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(8, units)).astype("float32"), rng.normal(size=(8, units)).astype("float32")
    copied, mapped = ksf.load_model(path), ksf.load_model(path, mmap=True)
    ksf.verification(mapped).result()
    same = np.array_equal(copied.predict(x, verbose=0), mapped.predict(x, verbose=0))
    copied.train_on_batch(x, y)
    mapped.train_on_batch(x, y)
    pairs = zip(measure.model_arrays(copied), measure.model_arrays(mapped), strict=True)
    return same and all(np.array_equal(a, b) for a, b in pairs)


def measure_directory(model, units: int, directory: str, repeats: int, log) -> dict:
    path = os.path.join(directory, "ksf-bench-mapped.keras")
    unaligned = os.path.join(directory, "ksf-bench-mapped-unaligned.keras")
    arrays = measure.model_arrays(model)
    ksf.save_model(model, path, aligned=True)
    ksf.save_model(model, unaligned)
    sizes = {"aligned": os.path.getsize(path), "unaligned": os.path.getsize(unaligned)}
    os.unlink(unaligned)

    def mapped_load(verify):
        start = time.perf_counter()
        loaded = ksf.load_model(path, mmap=True, verify=verify)
        elapsed = time.perf_counter() - start
        if verify == "background":
            ksf.verification(loaded).result()  # untimed: runs after the model is returned
        return elapsed

    ops = {
        "raw read": lambda: measure.timed(lambda: measure.raw_read(path)),
        "build (stock, from config)": lambda: measure.timed(lambda: measure.stock_build(path)),
        "copying load": lambda: measure.timed(lambda: ksf.load_model(path)),
        "mapped load": lambda: mapped_load("background"),
        "mapped load, verify=False": lambda: mapped_load(False),
    }
    try:
        digest = _digest(path)
        samples = measure.interleaved(
            ops,
            repeats,
            lambda rep: log(f"  {directory}: repeat {rep + 1}/{repeats} done"),
            backed=measure.backed_for(sum(a.nbytes for a in arrays)),
        )
        anonymous = {how: _anonymous_added(path, how) for how in ("copying", "mapped")}
        same = _same_as_a_copying_load(path, units)
        unchanged = _digest(path) == digest
    finally:
        os.unlink(path)
    return {
        "directory": directory,
        "nbytes": sum(a.nbytes for a in arrays),
        "sizes": sizes,
        "times": {name: statistics.median(v) for name, v in samples.items()},
        "spread": {name: (min(v), max(v)) for name, v in samples.items()},
        "anonymous": anonymous,
        "same": same,
        "unchanged": unchanged,
    }


def markdown(results: list[dict], info: dict, args) -> str:
    repeats, units = args.repeats, args.units
    lines = [
        f"{report.machine_line(info)}. "
        f"{info['date']}. 4 x Dense({units}) + Adam, saved with `aligned=True`. Medians of {repeats} repeats "
        f"(min-max), interleaved in a shuffled order, all in one run. The file is in the page cache. {report.BACKED}",
        "",
        "| dir | MB | raw read s | build (stock) s | copying load s | mapped load s | mapped, verify=False s "
        "| mapped / raw read | mapped / build |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        t, sp = r["times"], r["spread"]

        def cell(name, t=t, sp=sp):
            return f"{t[name]:.3f} ({sp[name][0]:.3f}-{sp[name][1]:.3f})"

        lines.append(
            f"| `{shown(r['directory'])}` | {r['nbytes'] / 1e6:.0f} | {cell('raw read')} | "
            f"{cell('build (stock, from config)')} | {cell('copying load')} | {cell('mapped load')} | "
            f"{cell('mapped load, verify=False')} | {t['mapped load'] / t['raw read']:.3f} | "
            f"{t['mapped load'] / t['build (stock, from config)']:.2f} |"
        )
    lines += [
        "",
        "Anonymous memory (RssAnon: not counting the file's pages in the page cache) the loaded model "
        "holds, after the load / after one training step on it (the pages Adam writes get private copies):",
        "",
        "| dir | copying load MiB | mapped load MiB | aligned file / stock-layout file (bytes) |",
        "|---|--:|--:|--:|",
    ]
    for r in results:
        a, s = r["anonymous"], r["sizes"]
        lines.append(
            f"| `{shown(r['directory'])}` | {a['copying'][0] / MIB:.0f} / {a['copying'][1] / MIB:.0f} | "
            f"{a['mapped'][0] / MIB:.0f} / {a['mapped'][1] / MIB:.0f} | "
            f"{s['aligned']:,} / {s['unaligned']:,} (+{s['aligned'] - s['unaligned']:,}) |"
        )
    checks = []
    for r in results:
        t, where = r["times"], shown(r["directory"])
        checks += [
            (f"`{where}`: mapped load ≤ 0.1 × raw read", t["mapped load"] <= 0.1 * t["raw read"]),
            (
                f"`{where}`: mapped load ≤ 1.1 × the build alone",
                t["mapped load"] <= 1.1 * t["build (stock, from config)"],
            ),
            (f"`{where}`: predictions and next training step bitwise a copying load's", r["same"]),
            (f"`{where}`: the file unchanged after training the mapped model", r["unchanged"]),
        ]
    lines += ["", *report.target_rows(checks), "", report.versions_line(info)]
    return "\n".join(lines) + "\n"


def _measure_fresh(units: int, directory: str, repeats: int) -> dict:
    return measure_directory(dense_model(units), units, directory, repeats, report.log)


def main() -> None:
    def measure(args, directory):
        # Each directory in a new process: one pass of the 3.2 GB case peaks near this machine's
        # 23.5 GiB, and a second pass in the same process was killed for memory here (see README).
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(_measure_fresh, args.units, directory, args.repeats).result()

    report.each_directory(__doc__, 8192, 5, "mapped.md", measure, markdown)


if __name__ == "__main__":
    main()
