"""`tf.distribute`: saves and loads under MirroredStrategy (two logical CPUs) and checkpoints of a
two-worker MultiWorkerMirroredStrategy cluster on loopback, each in fresh processes
(tests/distribute_worker.py); remote paths go to stock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import kerassave_fast as ksf
from conftest import MODELS, members_but_date, state_of

WORKER = os.path.join(os.path.dirname(__file__), "distribute_worker.py")


def _run(mode: str, out, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, WORKER, mode, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _results(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    (line,) = [x for x in stdout.splitlines() if x.startswith("RESULTS ")]
    return json.loads(line.removeprefix("RESULTS "))


def test_mirrored_strategy_saves_and_loads_as_stock(tmp_path):
    results = _results(_run("mirrored", tmp_path))
    assert results.pop("replicas") == 2
    assert results and all(results.values()), {k: v for k, v in results.items() if not v}


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_chief_writes_what_stock_writes(tmp_path):
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    configs = [{"cluster": cluster, "task": {"type": "worker", "index": i}} for i in range(2)]
    workers = [_run("multi_worker", tmp_path, {"TF_CONFIG": json.dumps(config)}) for config in configs]
    results = [_results(w) for w in workers]
    assert [r["chief"] for r in results] == [True, False]
    # The chief's checkpoints, nothing else: the other worker's temporary directories are gone.
    expected = sorted(f"{side}-{n}.{ext}" for side in ("ours", "stock") for n in (1, 2) for ext in ("h5", "keras"))
    assert sorted(os.listdir(tmp_path)) == expected
    for epoch in (1, 2):
        assert (tmp_path / f"ours-{epoch}.h5").read_bytes() == (tmp_path / f"stock-{epoch}.h5").read_bytes()
        assert members_but_date(tmp_path / f"ours-{epoch}.keras") == members_but_date(tmp_path / f"stock-{epoch}.keras")


@pytest.mark.parametrize("flavour", ["keras3", "tf_keras"])
def test_remote_paths_go_to_stock(flavour):
    """`ram://` is TensorFlow's in-memory file system: stock writes and reads it through tf.io.gfile."""
    if flavour == "keras3":
        model = MODELS["seed_example"]()
        path = "ram://kerassave_fast/m.keras"
        ksf.save_model(model, path)
        loaded = ksf.load_model(path)
        assert [a.tobytes() for _, a in state_of(loaded)] == [a.tobytes() for _, a in state_of(model)]
        handle = ksf.save_model(model, path, blocking=False)
        assert handle.done() and not handle.asynchronous
    else:
        import tf_keras_models

        model = tf_keras_models.trained(tf_keras_models.dense_adam)
        path = "ram://kerassave_fast/tf_keras_saved_model"
        ksf.save_model(model, path, save_format="tf")
        loaded = ksf.load_model_as("tf_keras", path)
        for a, b in zip(model.weights, loaded.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
