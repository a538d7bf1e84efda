"""`make bench`: stock Keras 3 vs kerassave_fast vs raw I/O of the same bytes, in one run.

Default: 4 x Dense(4096) + Adam after one training step (~0.8 GB of weights and optimizer state)
and ResNet50(weights=None) + Adam (~750 variables), each in /dev/shm and in a disk directory.
`--units 8192 --models dense --dirs DISK_DIR` is the 3.2 GB case. Writes benches/results/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import report
from measure import Result, run, save_json

HERE = os.path.dirname(os.path.abspath(__file__))


def dense_model(units: int) -> keras.Model:
    """4 x Dense(units) + Adam after one training step (weights + 2 Adam slots = 3 copies)."""
    model = keras.Sequential([keras.Input((units,))] + [keras.layers.Dense(units) for _ in range(4)])
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.normal(size=(8, units)).astype("float32"), rng.normal(size=(8, units)).astype("float32"))
    return model


def resnet_model() -> keras.Model:
    """ResNet50(weights=None) + Adam after one step: many small tensors."""
    model = keras.applications.ResNet50(weights=None)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.normal(size=(2, 224, 224, 3)).astype("float32"), np.array([1, 2]))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dense,resnet50", help="comma-separated: dense, resnet50")
    parser.add_argument("--units", type=int, default=4096, help="width of the dense model (8192: 3.2 GB)")
    parser.add_argument(
        "--dirs",
        default=f"/dev/shm,{os.path.join(HERE, 'scratch')}",
        help="comma-separated directories to save into (default: /dev/shm and a disk directory)",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--name", default="latest", help="basename of the files written to --out")
    args = parser.parse_args()

    directories = [d for d in args.dirs.split(",") if d]
    for d in directories:
        os.makedirs(d, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    results: list[Result] = []
    for name in args.models.split(","):
        log(f"building {name}")
        model = dense_model(args.units) if name == "dense" else resnet_model()
        label = f"dense{args.units}" if name == "dense" else name
        for directory in directories:
            log(f"measuring {label} in {directory}")
            results.append(run(label, model, directory, args.repeats, log))
        del model
        keras.backend.clear_session()

    info = report.machine(directories)
    table = report.markdown(results, info, args.repeats)
    base = os.path.join(args.out, args.name)
    with open(base + ".md", "w") as f:
        f.write(table)
    save_json(results, info, base + ".json")
    report.plot(results, base + ".png")
    print(table)
    log(f"wrote {base}.md, .json and .png")


if __name__ == "__main__":
    main()
