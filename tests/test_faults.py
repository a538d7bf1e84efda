"""Faults during a save: a process killed at any moment, a full disk, a refused write. The
previous file survives whole and loadable, and nothing is left that a later save trips over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import pytest

import kerassave_fast as ksf
from conftest import state_of

HERE = Path(__file__).parent
# Kill points per file format: half at each write-level step of a save, half at spread moments.
KILL_POINTS = int(os.environ.get("KSF_KILL_POINTS", "8"))
STEPS = 8  # write-level steps of a .keras save: 3 members, tensors, member end, directory, rename, +1 past the end


def _worker(path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "kill_worker.py"), str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        pytest.fail(f"worker did not start: {proc.stderr.read()[-3000:]}")
    return proc


def _loaded_state(path: Path, like: keras.Model | None) -> list[bytes]:
    if path.suffix in (".keras", ".h5") and not path.name.endswith(".weights.h5"):
        model = ksf.load_model(path)
    elif path.suffix == "":  # a tf_keras SavedModel: stock's loader is the judge
        import tf_keras

        return [w.tobytes() for w in tf_keras.models.load_model(path).get_weights()]
    else:
        model = keras.models.clone_model(like)
        model.compile(optimizer="adam", loss="mse")
        model.optimizer.build(model.trainable_variables)
        ksf.load_weights(model, path)
    return [b.tobytes() for _, b in state_of(model)]


def _kill_plan(points: int, by_step: bool, seconds: float) -> list[tuple[str, float | int]]:
    steps = [("step", 1 + k % STEPS) for k in range(points // 2 if by_step else 0)]
    times = points - len(steps)
    return steps + [("time", seconds * k / max(1, times)) for k in range(times)]


# name of the target -> (kill points, whether write-level steps are counted, seconds over which time kills spread)
KILL_TARGETS = {
    "m.keras": (KILL_POINTS, True, 0.4),
    "m.weights.h5": (max(4, KILL_POINTS // 2), True, 0.4),
    "m.h5": (max(4, KILL_POINTS // 2), True, 0.4),
    "m_savedmodel": (max(4, KILL_POINTS // 2), False, 3.0),  # tf_keras, a directory moved into place
}


@pytest.mark.parametrize("name", KILL_TARGETS)
def test_kill_minus_9_at_any_moment_keeps_the_previous_file(tmp_path, name):
    path = tmp_path / name
    points, by_step, seconds = KILL_TARGETS[name]
    like, expected, survived, left_behind = None, None, 0, set()
    for kind, when in _kill_plan(points, by_step, seconds):
        if kind == "step":
            proc = _worker(path, str(when))
        else:
            proc = _worker(path)  # `path` now holds a complete save of the worker's model
            proc.stdout.close()
            try:
                proc.wait(timeout=when)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
        proc.stderr.close()
        if proc.stdout and not proc.stdout.closed:
            proc.stdout.close()
        if like is None:
            like = _worker_model()
        state = _loaded_state(path, like)  # raises if the file is not a complete save
        if expected is None:
            expected = state
        assert state == expected, f"after a kill at {kind} {when}, {name} holds other weights"
        names = [n for n in os.listdir(tmp_path) if n != path.name]
        assert all(n.startswith(f".{path.name}.") and n.endswith((".tmp", ".old")) for n in names), names
        left_behind.update(names)
        survived += 1
    assert survived == points
    assert left_behind, "no kill landed in the middle of a save"
    ksf.save_weights(like, tmp_path / "other.weights.h5")  # a save beside it does not touch its temporaries
    if path.suffix == "":
        _worker(path, "0").communicate(timeout=120)  # a save that completes, by a tf_keras process
    elif path.name.endswith(".weights.h5"):
        ksf.save_weights(like, path)
    else:
        ksf.save_model(like, path)
    left = sorted(n for n in os.listdir(tmp_path) if n.endswith((".tmp", ".old")))
    assert not left, f"temporaries of killed saves were not cleaned up: {left}"


def _worker_model() -> keras.Model:
    sys.path.insert(0, str(HERE))
    try:
        import kill_worker
    finally:
        sys.path.remove(str(HERE))
    return kill_worker.model()


FULL_DISK = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np
    import kerassave_fast as ksf
    path, settings = sys.argv[1], json.loads(sys.argv[2])
    m = keras.Sequential([keras.Input((512,)), keras.layers.Dense(512), keras.layers.Dense(512)])
    ksf.save_model(m, path)  # a previous, complete file
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
    for save in (ksf.save_model, ksf.save_weights):
        try:
            save(m, path if save is ksf.save_model else path.replace(".keras", ".weights.h5"), **settings)
        except OSError as e:
            print(type(e).__name__, e.errno, os.path.dirname(path) in str(e))  # naming the file it wrote
        else:
            print("saved")
    """
)


@pytest.mark.parametrize("settings", [{}, {"compression": "gzip", "compression_level": 0}], ids=str)
def test_file_size_limit_gives_a_clean_os_error(tmp_path, settings):
    path = tmp_path / "m.keras"
    run = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(path), json.dumps(settings)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    import errno

    assert run.stdout.split() == ["OSError", str(errno.EFBIG), "True"] * 2, run.stdout + run.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["m.keras"], "a partial or temporary file was left"
    ksf.load_model(path)


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # a traceback may still hold a file open


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_full_disk_gives_enospc_and_keeps_the_previous_file(small_tmpfs, suffix):
    import errno

    small = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8)])
    big = keras.Sequential([keras.Input((1024,)), keras.layers.Dense(1024)])  # 4 MiB: does not fit
    path = small_tmpfs / f"m{suffix}"
    save = ksf.save_model if suffix == ".keras" else ksf.save_weights
    save(small, path)
    before = path.read_bytes()
    with pytest.raises(OSError) as e:
        save(big, path)
    assert e.value.errno == errno.ENOSPC
    assert any(n.startswith(f"{path} was not saved") for n in getattr(e.value, "__notes__", [])), e.value
    assert path.read_bytes() == before
    assert os.listdir(small_tmpfs) == [path.name]
