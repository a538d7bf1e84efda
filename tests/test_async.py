"""`save_model(..., blocking=False)` / `save_weights(..., blocking=False)`: the file written in the
background equals, bitwise, what a blocking save at the same training step writes, while
training goes on during the write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest

import kerassave_fast
from conftest import MODELS, _batch, members_but_date, state_of
from kerassave_fast import asynchronous


@pytest.fixture
def gate(monkeypatch):
    """Holds every background write until `gate.set()`: the test trains while the save waits."""
    event = threading.Event()
    started = []
    defer = asynchronous.Deferred.defer

    def gated_defer(self, write):
        def gated():
            started.append(True)
            assert event.wait(120), "the test never opened the gate"
            write()

        defer(self, gated)

    monkeypatch.setattr(asynchronous.Deferred, "defer", gated_defer)
    event.started = started
    yield event
    event.set()
    asynchronous.wait_for_previous()


def _train(model, steps: int = 3) -> None:
    x, y = _batch(model, seed=5)
    for _ in range(steps):
        model.train_on_batch(x, y)


def _contents(path) -> dict[str, bytes] | bytes:
    if str(path).endswith(".keras"):
        return members_but_date(path)
    with open(path, "rb") as f:
        return f.read()


SAVES = {
    "keras": (kerassave_fast.save_model, "m.keras"),
    "legacy_h5": (kerassave_fast.save_model, "m.h5"),
    "weights_h5": (kerassave_fast.save_weights, "m.weights.h5"),
}


@pytest.mark.parametrize("name", ["convnet", "low_precision", "optimizer_adamw", "optimizer_sgd_momentum"])
@pytest.mark.parametrize("kind", list(SAVES))
def test_background_write_equals_blocking_save_at_the_same_step(name, kind, tmp_path, gate):
    model = MODELS[name]()
    save, filename = SAVES[kind]
    expected = tmp_path / f"blocking-{filename}"
    save(model, expected)
    before = state_of(model)

    handle = save(model, tmp_path / filename, blocking=False)
    assert handle.asynchronous and not handle.done()
    _train(model)  # training goes on while the save waits to be written
    trained = state_of(model)
    assert any(not np.array_equal(a, b) for (_, a), (_, b) in zip(before, trained, strict=True))
    gate.set()
    assert handle.result(timeout=120) is None and handle.done()
    assert _contents(tmp_path / filename) == _contents(expected)


def test_tf_keras_background_write_equals_blocking_save(tmp_path, gate):
    """tf_keras' optimizers update slots in XLA-compiled steps: the snapshot holds there too."""
    import tf_keras_models

    model = tf_keras_models.trained(tf_keras_models.mixed_precision)
    kerassave_fast.save_model(model, tmp_path / "blocking.keras")
    handle = kerassave_fast.save_model(model, tmp_path / "m.keras", blocking=False)
    for _ in range(3):
        model.train_on_batch(*tf_keras_models.batch(model))
    gate.set()
    handle.result(timeout=120)
    assert _contents(tmp_path / "m.keras") == _contents(tmp_path / "blocking.keras")


def _bytes(state) -> list[bytes]:
    return [a.tobytes() for _, a in state]


def test_saved_file_loads_with_the_snapshot_state(tmp_path, gate):
    model = MODELS["optimizer_adam"]()
    at_save = state_of(model)
    handle = kerassave_fast.save_model(model, tmp_path / "m.keras", blocking=False)
    _train(model)
    gate.set()
    assert handle.wait(timeout=120)
    assert _bytes(state_of(keras.saving.load_model(tmp_path / "m.keras"))) == _bytes(at_save)


def test_a_failed_background_write_raises_from_result_and_keeps_the_old_file(tmp_path, monkeypatch):
    model = MODELS["seed_example"]()
    path = tmp_path / "m.keras"
    kerassave_fast.save_model(model, path)
    old = path.read_bytes()

    def broken_layout(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("kerassave_fast.formats.keras_zip.write_layout", broken_layout)
    handle = kerassave_fast.save_model(model, path, blocking=False)
    with pytest.raises(OSError, match="No space left"):
        handle.result(timeout=60)
    assert handle.done() and path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["m.keras"]  # no temporary left


def test_a_failed_background_write_no_one_asks_about_is_warned_of(tmp_path):
    """A blocking save would have raised it: a handle let go, or held at exit, without `.result()`,
    warns of it once; a handle asked does not."""
    script = f"""
import gc, sys, warnings, keras, kerassave_fast
warnings.simplefilter("always")
model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
missing = {str(tmp_path / "missing")!r}
asked = kerassave_fast.save_model(model, missing + "/asked.keras", blocking=False)
try:
    asked.result()
except OSError:
    print("raised", flush=True)
del asked
kerassave_fast.save_model(model, missing + "/dropped.keras", blocking=False)  # the handle let go at once
kerassave_fast.save_model(model, {str(tmp_path / "ok.keras")!r})  # waits for it
gc.collect()
held = kerassave_fast.save_model(model, missing + "/held.keras", blocking=False)  # still held at exit
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["raised"]
    warned = [line for line in run.stderr.splitlines() if "RuntimeWarning: kerassave_fast: the background save" in line]
    assert len(warned) == 2 and "dropped.keras" in warned[0] and "held.keras" in warned[1], run.stderr[-3000:]
    assert (tmp_path / "ok.keras").exists()


def test_errors_before_the_write_raise_at_the_call(tmp_path):
    model = MODELS["seed_example"]()
    with pytest.raises(ValueError, match="`blocking` must be True or False"):
        kerassave_fast.save_model(model, tmp_path / "m.keras", blocking="no")
    with pytest.raises(TypeError, match="must be a Keras model"):
        kerassave_fast.save_model(object(), tmp_path / "m.keras", blocking=False)


def test_saves_and_loads_wait_for_the_save_in_flight(tmp_path, gate):
    model = MODELS["optimizer_rmsprop"]()
    first = state_of(model)
    path = tmp_path / "m.keras"
    handle = kerassave_fast.save_model(model, path, blocking=False)
    _train(model)
    second = state_of(model)
    loaded = []
    loading = threading.Thread(target=lambda: loaded.append(state_of(kerassave_fast.load_model(path))))
    loading.start()
    time.sleep(0.5)
    assert not loaded and not handle.done()  # the load waits for the write, not for the old file
    gate.set()
    loading.join(120)
    handle.result()
    assert _bytes(loaded[0]) == _bytes(first)
    gate.clear()
    handle = kerassave_fast.save_model(model, path, blocking=False)
    threading.Timer(0.5, gate.set).start()
    kerassave_fast.save_weights(model, tmp_path / "w.weights.h5")  # a blocking save waits too
    assert handle.done()
    assert _bytes(state_of(kerassave_fast.load_model(path))) == _bytes(second)


def test_a_second_background_save_starts_after_the_first(tmp_path, gate):
    model = MODELS["seed_example"]()
    first = kerassave_fast.save_model(model, tmp_path / "a.keras", blocking=False)
    finished = []
    thread = threading.Thread(
        target=lambda: finished.append(kerassave_fast.save_weights(model, tmp_path / "b.weights.h5", blocking=False))
    )
    thread.start()
    time.sleep(0.5)
    assert not finished and len(gate.started) == 1  # the second waits before its snapshot
    gate.set()
    thread.join(120)
    (second,) = finished
    assert first.done() and second.result(timeout=60) is None
    assert os.path.exists(tmp_path / "b.weights.h5")


def test_saves_that_cannot_be_deferred_are_done_at_return(tmp_path):
    model = MODELS["seed_example"]()
    handle = kerassave_fast.save_model(model, tmp_path / "m", blocking=False, zipped=False)  # to stock
    assert not handle.asynchronous and handle.done() and handle.result() is None
    assert os.path.isdir(tmp_path / "m")


@pytest.mark.parametrize("what", ["model", "sharded-weights"])
def test_the_process_exits_after_the_background_write(tmp_path, what):
    """The last line of a script starts a background save: the process writes it before exiting,
    a sharded one included (its shards are written side by side, on threads started while the
    interpreter exits, after `concurrent.futures` has stopped taking work)."""
    path = tmp_path / ("m.keras" if what == "model" else "w.weights.json")
    save = {
        "model": f"kerassave_fast.save_model(m, {str(path)!r}, blocking=False, threads=1)",
        "sharded-weights": f"kerassave_fast.save_weights(m, {str(path)!r}, max_shard_size=0.001, blocking=False)",
    }[what]
    script = f"""
import keras, kerassave_fast
m = keras.Sequential([keras.Input((64,)), keras.layers.Dense(512), keras.layers.Dense(512)])
m.compile("adam", "mse")
handle = {save}
print("returned", handle.done())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert "returned" in out.stdout
    if what == "model":
        assert len(keras.saving.load_model(path).weights) == 4
        return
    assert len(list(tmp_path.glob("w_*.weights.h5"))) > 1
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(512), keras.layers.Dense(512)])
    model.load_weights(path)  # stock's reader: every shard complete


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM", "SIGINT, stderr closed"])
def test_an_interrupt_while_the_process_waits_at_exit_for_a_background_save(tmp_path, signal_name):
    """Ctrl-C (or a SIGTERM handler's `SystemExit`) during the exit's wait for a background save:
    the save still ends, its file complete and no temporary file left (the interpreter went on
    finalizing under the writer thread: a segfault), and the process says why it waits -- or
    cannot say it, its stderr a closed pipe (`| tee` interrupted too), and waits all the same."""
    path = tmp_path / "m.keras"
    script = f"""
import signal, sys
import keras, numpy as np, kerassave_fast
signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))
signal.signal(signal.SIGINT, signal.default_int_handler)  # (a shell starting a job in the background ignores it)
m = keras.Sequential([keras.Input((2048,)), keras.layers.Dense(4096), keras.layers.Dense(4096)])
kerassave_fast.save_model(m, {str(path)!r}, blocking=False, compression="gzip", compression_level=6, threads=1)
np.save({str(tmp_path / "expected.npy")!r}, m.layers[-1].kernel.numpy())
print("started", flush=True)
"""
    child = _started_child(script)
    if "stderr closed" in signal_name:
        child.stderr.close()
    child.send_signal(getattr(signal, signal_name.split(",")[0]))
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    assert "stderr closed" in signal_name or "finishing the background save" in err
    assert sorted(os.listdir(tmp_path)) == ["expected.npy", "m.keras"]
    loaded = keras.saving.load_model(path)  # stock's reader
    np.testing.assert_array_equal(loaded.layers[-1].kernel.numpy(), np.load(tmp_path / "expected.npy"))


def _started_child(script: str) -> subprocess.Popen:
    """`script` running, past its line printing "started" (a background save begun just before)."""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "started"
    time.sleep(0.3)
    assert child.poll() is None, "the save ended before the signal: nothing tested"
    return child


def test_a_second_interrupt_leaves_the_background_save_unfinished(tmp_path):
    """Asked twice, the exit does not wait (a write that never ends would hold the process): it
    ends at once, without the finalization that would crash under the writer thread; the previous
    file is whole."""
    path = tmp_path / "m.keras"
    script = f"""
import signal, keras, kerassave_fast
signal.signal(signal.SIGINT, signal.default_int_handler)  # (a shell starting a job in the background ignores it)
m = keras.Sequential([keras.Input((2048,)), keras.layers.Dense(4096), keras.layers.Dense(4096)])
kerassave_fast.save_model(m, {str(path)!r})
kerassave_fast.save_model(m, {str(path)!r}, blocking=False, compression="gzip", compression_level=9, threads=1)
print("started", flush=True)
"""
    child = _started_child(script)
    child.send_signal(signal.SIGINT)
    time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 1 and "leaving the background save" in err, err[-3000:]
    assert len(keras.saving.load_model(path).weights) == 4  # the previous file


def test_no_writer_thread_fails_the_background_save_and_the_exit_does_not_wait(tmp_path):
    """A writer thread that cannot start (a process at its thread limit) fails the save at once;
    the exit then has nothing to wait for."""
    script = f"""
import threading, keras, kerassave_fast
m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])
start = threading.Thread.start
def refused(self):
    raise RuntimeError("can't start new thread")
threading.Thread.start = refused
try:
    kerassave_fast.save_model(m, {str(tmp_path / "m.keras")!r}, blocking=False)
except RuntimeError as e:
    print("refused:", e)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "refused: can't start new thread" in run.stdout, run.stderr[-3000:]


def _fit_with(callback_class, tmp_path, flavour="keras3", **callback_kwargs):
    """Two epochs of 4 batches from the same seed, checkpointed by `callback_class`."""
    if flavour == "keras3":
        keras.utils.set_random_seed(3)
        optimizer = keras.optimizers.Adam(name="adam")  # unnamed, its name counts the session's Adams
        layers = keras.layers
        hidden, out = layers.Dense(16, activation="relu", name="hidden"), layers.Dense(2, name="out")
        model = keras.Sequential([keras.Input((6,), name="x"), hidden, out], name="net")
    else:
        import tf_keras

        tf_keras.utils.set_random_seed(3)
        optimizer = tf_keras.optimizers.Adam(name="adam")
        layers = tf_keras.layers
        model = tf_keras.Sequential(
            [layers.Dense(16, activation="relu", input_shape=(6,), name="hidden"), layers.Dense(2, name="out")],
            name="net",
        )
    model.compile(optimizer, "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    callback = callback_class(**callback_kwargs)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, validation_data=(x, y), callbacks=[callback])
    return callback


@pytest.mark.parametrize(
    "template, options",
    [
        ("ckpt-{epoch:02d}.keras", {}),
        ("ckpt-{epoch:02d}-{batch}.weights.h5", {"save_weights_only": True, "save_freq": 2}),
        ("best.keras", {"save_best_only": True, "monitor": "val_loss"}),
    ],
)
def test_async_model_checkpoint_writes_what_model_checkpoint_writes(template, options, tmp_path):
    from kerassave_fast.callbacks import AsyncModelCheckpoint

    (tmp_path / "stock").mkdir()
    _fit_with(keras.callbacks.ModelCheckpoint, tmp_path, filepath=str(tmp_path / "stock" / template), **options)
    ours = _fit_with(AsyncModelCheckpoint, tmp_path, filepath=str(tmp_path / "ours" / template), **options)
    assert ours._in_flight is None  # the end of fit() waited for the last save
    written = sorted(os.listdir(tmp_path / "stock"))
    assert len(written) >= (1 if "best" in template else 2)
    assert sorted(os.listdir(tmp_path / "ours")) == written
    for name in written:
        assert _contents(tmp_path / "ours" / name) == _contents(tmp_path / "stock" / name), name


def test_async_model_checkpoint_raises_a_failed_write(tmp_path, monkeypatch):
    from kerassave_fast.callbacks import AsyncModelCheckpoint

    def broken_layout(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("kerassave_fast.formats.keras_zip.write_layout", broken_layout)
    with pytest.raises(OSError, match="No space left") as raised:
        _fit_with(AsyncModelCheckpoint, tmp_path, filepath=str(tmp_path / "ckpt-{epoch}.keras"))
    failed = [p for p in ("ckpt-1.keras", "ckpt-2.keras") if repr(str(tmp_path / p)) in raised.value.__notes__[-1]]
    assert failed and not (tmp_path / failed[0]).exists()  # the note names the save that failed


@pytest.mark.parametrize("flavour", ["keras3", "tf_keras"])
def test_a_checkpoint_path_that_is_a_directory_is_refused_at_its_save_as_stock(flavour, tmp_path):
    """Stock's callback raises at the save whose path is a directory, naming it; so does ours,
    rather than at the next save, through the background write's error."""
    if flavour == "keras3":
        stock_class = keras.callbacks.ModelCheckpoint
        from kerassave_fast.callbacks import AsyncModelCheckpoint as ours_class
    else:
        import tf_keras

        from kerassave_fast.callbacks import TFKerasAsyncModelCheckpoint as ours_class

        stock_class = tf_keras.callbacks.ModelCheckpoint
    messages = {}
    for name, callback_class in (("stock", stock_class), ("ours", ours_class)):
        (tmp_path / name / "ckpt-2.keras").mkdir(parents=True)
        with pytest.raises(OSError) as raised:
            _fit_with(callback_class, tmp_path, flavour, filepath=str(tmp_path / name / "ckpt-{epoch}.keras"))
        messages[name] = str(raised.value).replace(f"/{name}/", "/")
        assert sorted(os.listdir(tmp_path / name)) == ["ckpt-1.keras", "ckpt-2.keras"]
    assert messages["ours"] == messages["stock"]


def test_a_tf_keras_saved_model_checkpoint_is_saved_over_as_stock(tmp_path):
    """A SavedModel checkpoint is a directory: saved again to the same path, as stock's callback does."""
    import tf_keras

    from kerassave_fast.callbacks import TFKerasAsyncModelCheckpoint

    for name, callback_class in (("stock", tf_keras.callbacks.ModelCheckpoint), ("ours", TFKerasAsyncModelCheckpoint)):
        _fit_with(callback_class, tmp_path, "tf_keras", filepath=str(tmp_path / name / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ours" / "ckpt")) == sorted(os.listdir(tmp_path / "stock" / "ckpt"))


class _SavesItsTokenizerToo(keras.Sequential):
    """A model whose own `save` writes a file beside the model (as models with a tokenizer do)."""

    def save(self, filepath, *args, **kwargs):
        super().save(filepath, *args, **kwargs)
        with open(f"{filepath}.tokenizer", "w") as f:
            f.write("vocabulary")


def test_a_model_s_own_save_is_what_the_checkpoint_calls_as_in_stock(tmp_path):
    from kerassave_fast.callbacks import AsyncModelCheckpoint

    x, y = np.ones((8, 4), np.float32), np.ones((8, 1), np.float32)
    for name, callback_class in (("stock", keras.callbacks.ModelCheckpoint), ("ours", AsyncModelCheckpoint)):
        model = _SavesItsTokenizerToo([keras.Input((4,)), keras.layers.Dense(1)], name="net")
        model.compile("sgd", "mse")
        model.fit(x, y, epochs=2, verbose=0, callbacks=[callback_class(str(tmp_path / name / "ckpt-{epoch}.keras"))])
    written = sorted(os.listdir(tmp_path / "stock"))
    assert written == ["ckpt-1.keras", "ckpt-1.keras.tokenizer", "ckpt-2.keras", "ckpt-2.keras.tokenizer"]
    assert sorted(os.listdir(tmp_path / "ours")) == written


@pytest.mark.parametrize("template", ["ckpt-{epoch:02d}.keras", "ckpt-{epoch:02d}.h5"])
def test_tf_keras_async_model_checkpoint_writes_what_model_checkpoint_writes(template, tmp_path):
    import tf_keras

    from kerassave_fast.callbacks import TFKerasAsyncModelCheckpoint

    (tmp_path / "stock").mkdir()
    (tmp_path / "ours").mkdir()
    _fit_with(tf_keras.callbacks.ModelCheckpoint, tmp_path, "tf_keras", filepath=str(tmp_path / "stock" / template))
    _fit_with(TFKerasAsyncModelCheckpoint, tmp_path, "tf_keras", filepath=str(tmp_path / "ours" / template))
    written = sorted(os.listdir(tmp_path / "stock"))
    assert len(written) == 2 and sorted(os.listdir(tmp_path / "ours")) == written
    for name in written:
        assert _contents(tmp_path / "ours" / name) == _contents(tmp_path / "stock" / name), name
