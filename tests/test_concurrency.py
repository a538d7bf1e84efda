"""Saves and loads on several threads at once: process-wide state (the GC pause, the optimizer
shim, thread pools) stays consistent."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import kerassave_fast as ksf
from conftest import assert_same_state
from kerassave_fast import api
from kerassave_fast.keras3 import state


def test_gc_pause_is_counted_across_threads(monkeypatch):
    """B enters while A holds collections off and A leaves while B is between asking and switching:
    the thresholds must end up as they were before either began."""
    thresholds = {"now": (700, 10, 10)}
    a_left = threading.Event()

    class RecordingGC:
        def get_threshold(self):
            return thresholds["now"]

        def set_threshold(self, *values):
            if threading.current_thread().name == "B" and values[0] == 0:
                a_left.wait(2)
            thresholds["now"] = values

    monkeypatch.setattr(api, "gc", RecordingGC())
    a_inside, a_may_leave = threading.Event(), threading.Event()

    def a():
        with api._no_gc_pauses():
            a_inside.set()
            a_may_leave.wait(5)
        a_left.set()

    def b():
        a_inside.wait(5)
        with api._no_gc_pauses():
            pass

    threads = [threading.Thread(target=a, name="A"), threading.Thread(target=b, name="B")]
    for t in threads:
        t.start()
    time.sleep(0.2)
    a_may_leave.set()
    for t in threads:
        t.join(10)
    assert thresholds["now"] == (700, 10, 10), "the cyclic GC's collections were left off"


_MEANWHILE = {  # what another thread of the application does to the GC, and how it is then
    "disable": (lambda gc: gc.disable(), lambda gc, was: (False, was)),
    "enable": (lambda gc: gc.enable(), lambda gc, was: (True, was)),
    "set_threshold": (lambda gc: gc.set_threshold(500, 5, 5), lambda gc, was: (True, (500, 5, 5))),
}


@pytest.mark.parametrize("meanwhile", list(_MEANWHILE))
def test_the_applications_gc_choice_made_during_a_save_is_kept(model_zoo, tmp_path, monkeypatch, meanwhile):
    """Another thread of the application turns the GC off or on, or sets its thresholds, while a
    save runs: the save's end leaves that choice as it is."""
    import gc

    model, path = model_zoo("seed_example"), tmp_path / "m.keras"
    was_enabled, was = gc.isenabled(), gc.get_threshold()
    change, expected = _MEANWHILE[meanwhile]
    real_serialize, changed = state.serialize_model_as_json, []

    def serialize_model_as_json(*args, **kwargs):
        other = threading.Thread(target=lambda: changed.append(change(gc)))
        other.start()
        other.join(5)
        return real_serialize(*args, **kwargs)

    monkeypatch.setattr(state, "serialize_model_as_json", serialize_model_as_json)
    if meanwhile == "enable":
        gc.disable()
    try:
        ksf.save_model(model, path)
        assert changed
        assert (gc.isenabled(), gc.get_threshold()) == expected(gc, was)
    finally:
        gc.set_threshold(*was)
        (gc.enable if was_enabled else gc.disable)()
    assert_same_state(model, ksf.load_model(path))


def test_two_threads_planning_one_model_both_record_by_reference(model_zoo, monkeypatch):
    """The second save starts while the first is inside the optimizer shim, and the first leaves
    before the second walks the optimizer: each still records the slots as views, without error."""
    model = model_zoo("optimizer_adam")
    real_save_state = state.saving_lib._save_state
    first_inside, second_inside, first_left = threading.Event(), threading.Event(), threading.Event()
    plans, errors = {}, []

    def save_state(saveable, *args, **kwargs):
        if saveable is model:  # the top of the walk (it recurses through this name)
            if threading.current_thread().name == "first":
                first_inside.set()
                second_inside.wait(10)
            else:
                second_inside.set()
                first_left.wait(10)
        return real_save_state(saveable, *args, **kwargs)

    monkeypatch.setattr(state.saving_lib, "_save_state", save_state)

    def plan(name):
        try:
            plans[name], _ = state.plan_model_state(model, with_assets=False)
        except BaseException as e:
            errors.append(e)
        finally:
            if name == "first":
                first_left.set()

    threads = {n: threading.Thread(target=plan, args=(n,), name=n) for n in ("first", "second")}
    threads["first"].start()
    first_inside.wait(10)
    threads["second"].start()
    for t in threads.values():
        t.join(30)
    assert not errors, errors
    slots = {id(v): v for v in model.optimizer.variables}
    for name, plan_ in plans.items():
        optimizer_steps = [d for d in plan_.datasets if d.group.startswith("optimizer")]
        assert len(optimizer_steps) == len(slots)
        for d, v in zip(optimizer_steps, model.optimizer.variables, strict=True):
            if d.array.nbytes:
                assert np.shares_memory(d.array, np.asarray(v.value.value())), f"{name} copied {v.path}"
    assert "save_own_variables" not in vars(model.optimizer), "the shim outlived the saves"


def test_concurrent_saves_and_loads(model_zoo, tmp_path):
    models = [model_zoo("optimizer_adam"), model_zoo("optimizer_adam"), model_zoo("low_precision")]
    errors = []

    def work(i, model):
        try:
            for k in range(3):
                path = tmp_path / f"m{i}-{k}.keras"
                ksf.save_model(model, path, threads=2)
                assert_same_state(model, ksf.load_model(path, threads=2))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, m)) for i, m in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    import gc

    assert gc.isenabled() and gc.get_threshold()[0] > 0


@pytest.mark.parametrize("threads", [0, -1, 257, 10**5, 2.0, True])
def test_thread_counts_are_bounded(model_zoo, tmp_path, threads):
    with pytest.raises(ValueError, match="threads"):
        ksf.save_model(model_zoo("seed_example"), tmp_path / "m.keras", threads=threads)


READER = """
import hashlib, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import kerassave_fast as ksf
path, stop = sys.argv[1], sys.argv[2]
while not os.path.exists(stop):
    weights = ksf.load_model(path, compile=False).get_weights()
    print(hashlib.sha256(b"".join(w.tobytes() for w in weights)).hexdigest(), flush=True)
"""


def _weights_digest(model) -> str:
    import hashlib

    return hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_save_while_another_process_loads_the_file(model_zoo, tmp_path, suffix):
    """A process loading the file in a loop while saves replace it sees, each time, one whole save:
    the previous model's weights or the new one's, never a mix, never an error."""
    import subprocess
    import sys

    import keras

    a = model_zoo("optimizer_adam")
    b = keras.models.clone_model(a)  # another model of the same architecture, other weights
    b.set_weights([w + 1 for w in a.get_weights()])
    expected = {_weights_digest(a), _weights_digest(b)}
    path, stop = tmp_path / f"m{suffix}", tmp_path / "stop"
    ksf.save_model(a, path)
    errors = open(tmp_path / "reader.err", "w+")  # a file: a pipe nobody reads could fill and block it
    command = [sys.executable, "-c", READER, str(path), str(stop)]
    reader = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
    seen: list[str] = []
    listener = threading.Thread(target=lambda: seen.extend(line.split()[0] for line in reader.stdout if line.split()))
    listener.start()
    try:
        saves, deadline = 0, time.monotonic() + 120
        while len(seen) < 12 and reader.poll() is None and time.monotonic() < deadline:
            ksf.save_model(b if saves % 2 == 0 else a, path)  # each load overlaps several saves
            saves += 1
    finally:
        stop.touch()
        reader.wait(timeout=120)
        listener.join()  # it owns stdout until the reader exits
        reader.stdout.close()
        errors.seek(0)
        err = errors.read()
        errors.close()
    assert reader.returncode == 0, err[-3000:]
    assert set(seen) <= expected, f"a load saw weights of neither save: {set(seen) - expected}"
    assert len(seen) >= 12 and saves > len(seen), (len(seen), saves)
    assert len(set(seen)) == 2, "the loads never saw a save replace the file"
