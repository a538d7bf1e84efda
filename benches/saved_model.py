"""tf_keras SavedModel (`save_format="tf"`) and TF-format weights: stock vs kerassave_fast vs raw I/O of
the same bytes, medians of repeats interleaved in a shuffled order, all in one run; writes
benches/results/saved-model.md.

    python benches/saved_model.py [--units 4096] [--repeats 7] [--dir /dev/shm]

Model: 4 x Dense(units) + Adam after one training step (tf_keras), a metric. A SavedModel save is
TensorFlow tracing and writing the graph, plus the variables: "graph only" is tf_keras' save with
TensorFlow's checkpoint writer skipped (`save_and_return_nodes(..., experimental_skip_checkpoint=True)`),
the floor of a save whose variables cost nothing. The variables alone are timed as TF-format
`save_weights` / `load_weights` (the same tensor bundle, the same bytes): TensorFlow's writer and
reader against ours. Loads of the variables go into a trained copy of the model (its optimizer
built, so every tensor is restored at once). Last, the same layers in Keras 3: `model.export`
(an inference SavedModel, weights only) against `export_saved_model`.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tf_keras

sys.path.insert(0, str(Path(__file__).parent))
import kerassave_fast as ksf
import measure
import report


def dense_model(units: int):
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential(
        [tf_keras.layers.Dense(units, input_shape=(units,))] + [tf_keras.layers.Dense(units) for _ in range(3)]
    )
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.normal(size=(8, units)).astype("float32"), rng.normal(size=(8, units)).astype("float32"))
    return model


def keras3_dense_model(units: int):
    """The same model in Keras 3, for `export` (its inference SavedModel holds the weights only)."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((units,))] + [keras.layers.Dense(units) for _ in range(4)])
    model.compile(optimizer="adam", loss="mse")
    return model


def graph_only_save(model, path: str, save_traces: bool) -> None:
    """tf_keras' SavedModel save with TensorFlow's checkpoint writer skipped."""
    from tensorflow.python.saved_model import save as save_lib

    real = save_lib.save_and_return_nodes

    def skipping(obj, export_dir, signatures=None, options=None):
        return real(obj, export_dir, signatures, options, experimental_skip_checkpoint=True)

    save_lib.save_and_return_nodes = skipping
    try:
        model.save(path, save_format="tf", save_traces=save_traces)
    finally:
        save_lib.save_and_return_nodes = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", default="/dev/shm")
    args = parser.parse_args()
    info = report.machine([args.dir])
    work = os.path.join(args.dir, "ksf-saved-model-bench")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    model = dense_model(args.units)
    target = dense_model(args.units)
    keras3_model = keras3_dense_model(args.units)
    arrays = measure.model_arrays(model)
    nbytes = sum(a.nbytes for a in arrays)
    raw_path = os.path.join(work, "raw")
    model.save(os.path.join(work, "ref"), save_format="tf")  # what the loads read (stock's file)

    stale: list[str] = []  # earlier outputs moved aside inside a timed call, deleted after it

    def fresh(name: str) -> str:
        """A path with nothing there; what was there is freed after the call, untimed (freeing
        800 MB of tmpfs takes ~0.1 s, which no save of a new directory pays)."""
        path = os.path.join(work, name)
        if os.path.exists(path):
            stale.append(f"{path}.old{len(stale)}")
            os.rename(path, stale[-1])
        return path

    def raw_read() -> None:
        buffer = np.empty(nbytes, np.uint8)
        with open(raw_path, "rb", buffering=0) as f:
            f.readinto(buffer)

    weights = os.path.join(work, "ref", "variables", "variables")
    cases = {
        "raw write": lambda: measure.raw_write(arrays, raw_path),
        "raw write, 2 threads": lambda: measure.raw_write_threads(arrays, raw_path, 2),
        "raw read": raw_read,
        "variables: save stock": lambda: model.save_weights(os.path.join(fresh("sw_stock"), "w")),
        "variables: save ours": lambda: ksf.save_weights(model, os.path.join(fresh("sw_ours"), "w")),
        "variables: load stock": lambda: target.load_weights(weights),
        "variables: load ours": lambda: ksf.load_weights(target, weights),
        "load_model stock": lambda: tf_keras.models.load_model(os.path.join(work, "ref")),
        "load_model ours": lambda: ksf.load_model_as("tf_keras", os.path.join(work, "ref")),
        "Keras 3 export stock": lambda: keras3_model.export(fresh("e"), verbose=False),
        "Keras 3 export ours": lambda: ksf.export_saved_model(keras3_model, fresh("e"), verbose=False),
    }
    for traces in (True, False):
        cases |= {
            f"save graph only, save_traces={traces}": lambda t=traces: graph_only_save(model, fresh("g"), t),
            f"save stock, save_traces={traces}": lambda t=traces: model.save(
                fresh("s"), save_format="tf", save_traces=t
            ),
            f"save ours, save_traces={traces}": lambda t=traces: ksf.save_model(model, fresh("o"), save_traces=t),
        }
    measure.raw_write(arrays, raw_path)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        order = list(cases)
        random.shuffle(order)
        for name in order:
            measure.back_memory(measure.backed_for(nbytes))
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
            while stale:
                shutil.rmtree(stale.pop())
    rss = {
        "stock": measure.extra_peak_rss(lambda: model.save(fresh("s"), save_format="tf")),
        "ours": measure.extra_peak_rss(lambda: ksf.save_model(model, fresh("o"))),
    }
    shutil.rmtree(work, ignore_errors=True)
    t = {name: statistics.median(ts) for name, ts in times.items()}
    spread = {name: f"{min(ts):.3f}-{max(ts):.3f}" for name, ts in times.items()}
    lines = [
        f"{report.machine_line(info)}. "
        f"{info['date']}. Medians of {args.repeats} repeats, interleaved in a shuffled order, all in one run; "
        f"`{args.dir}`. tf_keras 4 × Dense({args.units}) + Adam after one step, {nbytes / 1e6:.0f} MB of variables. "
        + report.BACKED,
        "",
        "| case | s | min-max | ratio |",
        "|---|--:|--:|--:|",
    ]

    def row(name: str, ratio: str = "") -> None:
        lines.append(f"| {name} | {t[name]:.3f} | {spread[name]} | {ratio} |")

    row("raw write")
    row("raw write, 2 threads", f"{t['raw write, 2 threads'] / t['raw write']:.2f}× raw write")
    row("raw read")
    for side in ("stock", "ours"):
        row(f"variables: save {side}", f"{t[f'variables: save {side}'] / t['raw write']:.2f}× raw write")
    for side in ("stock", "ours"):
        row(f"variables: load {side}", f"{t[f'variables: load {side}'] / t['raw read']:.2f}× raw read")
    for traces in (True, False):
        graph = t[f"save graph only, save_traces={traces}"]
        row(f"save graph only, save_traces={traces}")
        for side in ("stock", "ours"):
            row(
                f"save {side}, save_traces={traces}",
                f"{t[f'save {side}, save_traces={traces}'] / graph:.2f}× graph only",
            )
    row("load_model stock")
    row("load_model ours", f"{t['load_model stock'] / t['load_model ours']:.2f}× faster than stock")
    row("Keras 3 export stock")
    row("Keras 3 export ours", f"{t['Keras 3 export stock'] / t['Keras 3 export ours']:.2f}× faster than stock")
    targets = [
        (
            "variables: our writer ≥ 3× faster than TensorFlow's",
            t["variables: save stock"] / t["variables: save ours"] >= 3,
        ),
        ("variables: our writer ≤ 1.25× raw write", t["variables: save ours"] <= 1.25 * t["raw write"]),
        ("variables: our reader ≤ 1.25× raw read", t["variables: load ours"] <= 1.25 * t["raw read"]),
    ]
    for traces in (True, False):
        ours, stock = t[f"save ours, save_traces={traces}"], t[f"save stock, save_traces={traces}"]
        graph = t[f"save graph only, save_traces={traces}"]
        targets += [
            (f"save_traces={traces}: whole save ≤ 1.25× graph only", ours <= 1.25 * graph),
            (f"save_traces={traces}: whole save ≥ 1.5× faster than stock", stock >= 1.5 * ours),
        ]
    targets.append(("load_model ≥ 2× faster than stock", t["load_model stock"] >= 2 * t["load_model ours"]))
    lines += [
        "",
        f"Extra RSS while saving the SavedModel: stock {rss['stock'] / 2**20:.0f} MiB, "
        f"ours {rss['ours'] / 2**20:.0f} MiB. "
        "Our `load_model` also restores the optimizer's saved state (stock compiles a fresh optimizer).",
        "",
        *report.target_rows(targets),
        "",
        # What the hardware allows the two targets above that are measured against TensorFlow's own times.
        f"Bounds in this run: 3× faster than TensorFlow's writer is {t['variables: save stock'] / 3:.3f} s, and "
        f"two threads wrote the same bytes raw in {t['raw write, 2 threads']:.3f} s; 1.25× the graph-only save is "
        f"{1.25 * t['save graph only, save_traces=True']:.3f} s (`save_traces=True`) and "
        f"{1.25 * t['save graph only, save_traces=False']:.3f} s (False), beside which the variables' bytes alone "
        "took the time above.",
        "",
        report.versions_line(info),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (Path(__file__).parent / "results" / "saved-model.md").write_text(text)


if __name__ == "__main__":
    main()
