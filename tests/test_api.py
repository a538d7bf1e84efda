"""The public API: stock's arguments, errors, overwrite rule, atomic saves, flavour dispatch."""

from __future__ import annotations

import gc
import io
import os
import random
import stat
import sys
import threading

import keras
import numpy as np
import pytest

import kerassave_fast as ksf
from conftest import assert_same_state
from kerassave_fast.formats import keras_zip


@pytest.fixture
def model(model_zoo):
    return model_zoo("seed_example")


@pytest.fixture
def no_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


def _same_error(call_stock, call_ours):
    """Both calls raise; ours raises stock's exception type with stock's message."""
    with pytest.raises(Exception) as stock:
        call_stock()
    with pytest.raises(type(stock.value)) as ours:
        call_ours()
    assert str(ours.value) == str(stock.value)


@pytest.mark.parametrize(
    "filename, kwargs",
    [
        ("m.txt", {}),
        ("m.keras", {"signatures": None}),
        ("m.keras", {"save_traces": False}),
        ("m", {"save_format": "tf"}),
    ],
)
def test_argument_errors_are_stocks(model, tmp_path, filename, kwargs):
    path = tmp_path / filename
    _same_error(lambda: keras.saving.save_model(model, path, **kwargs), lambda: ksf.save_model(model, path, **kwargs))
    assert not path.exists()


def test_our_own_arguments_are_checked(model, tmp_path):
    with pytest.raises(ValueError, match="threads"):
        ksf.save_model(model, tmp_path / "m.keras", threads=0)
    with pytest.raises(ValueError, match="compression"):
        ksf.save_model(model, tmp_path / "m.keras", compression="brotli")
    with pytest.raises(TypeError, match="Keras model"):
        ksf.save_model(object(), tmp_path / "m.keras")
    with pytest.raises(ValueError, match="threads"):
        ksf.save_model(model, tmp_path / "m.keras", threads=10**5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'options'"):
        keras.saving.load_model(tmp_path / "m.keras", options=None)
    with pytest.raises(TypeError, match="unexpected keyword argument 'options'"):
        ksf.load_model(tmp_path / "m.keras", options=None)


def test_threads_argument_gives_the_same_file(model, tmp_path):
    one, two = tmp_path / "one.keras", tmp_path / "two.keras"
    ksf.save_model(model, one, threads=1)
    ksf.save_model(model, two, threads=2)
    assert keras_zip.KerasArchive(str(one)).read("model.weights.h5") == keras_zip.KerasArchive(str(two)).read(
        "model.weights.h5"
    )
    assert_same_state(model, ksf.load_model(two, threads=1))


def test_overwrite_false_without_terminal_never_clobbers(model, tmp_path, no_terminal):
    path = tmp_path / "m.keras"
    path.write_bytes(b"previous")
    with pytest.raises(FileExistsError, match="overwrite"):
        ksf.save_model(model, path, overwrite=False)
    assert path.read_bytes() == b"previous"
    fresh = tmp_path / "fresh.keras"
    ksf.save_model(model, fresh, overwrite=False)
    assert_same_state(model, ksf.load_model(fresh))


@pytest.mark.parametrize("answer", [True, False])
def test_overwrite_false_on_a_terminal_asks(model, tmp_path, monkeypatch, answer):
    from keras.src.utils import io_utils

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    asked = []
    monkeypatch.setattr(io_utils, "ask_to_proceed_with_overwrite", lambda p: asked.append(p) or answer)
    path = tmp_path / "m.keras"
    path.write_bytes(b"previous")
    ksf.save_model(model, path, overwrite=False)
    assert asked == [path]
    assert (path.read_bytes() != b"previous") == answer


def test_failed_save_keeps_the_previous_file(model, tmp_path, monkeypatch):
    path = tmp_path / "m.keras"
    ksf.save_model(model, path)
    before = path.read_bytes()

    finish = keras_zip.StreamedWrite.finish

    def fail_midway(*args, **kwargs):  # once the tensors of the repeated save are written
        finish(*args, **kwargs)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(keras_zip.StreamedWrite, "finish", fail_midway)
    with pytest.raises(RuntimeError, match="disk on fire"):
        ksf.save_model(model, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.keras"], "a temporary file was left behind"


def test_missing_directory_is_stocks_error(model, tmp_path):
    path = tmp_path / "no" / "such" / "m.keras"
    with pytest.raises(FileNotFoundError):
        keras.saving.save_model(model, path)
    with pytest.raises(FileNotFoundError):
        ksf.save_model(model, path)


def test_symlink_is_followed_and_mode_kept(model, tmp_path):
    target, link = tmp_path / "real.keras", tmp_path / "link.keras"
    target.write_bytes(b"old")
    target.chmod(0o640)
    link.symlink_to(target)
    ksf.save_model(model, link)
    assert link.is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert_same_state(model, ksf.load_model(link))


def test_new_file_mode_follows_umask(model, tmp_path):
    old = os.umask(0o027)
    try:
        ksf.save_model(model, tmp_path / "m.keras")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.keras").stat().st_mode) == 0o640


def test_unbuilt_model_warns_like_stock(tmp_path):
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.warns(UserWarning, match="not yet been built"):
        ksf.save_model(model, tmp_path / "m.keras")
    loaded = ksf.load_model(tmp_path / "m.keras")
    assert not loaded.built


def test_legacy_h5_is_delegated_to_stock(model, tmp_path):
    path = tmp_path / "m.h5"
    ksf.save_model(model, path)
    for load in (keras.saving.load_model, ksf.load_model):
        loaded = load(path, compile=False)
        for a, b in zip(model.weights, loaded.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Stock's .h5 save drops the optimizer from the model's compile config; ours puts it back.
    ksf.save_model(model, tmp_path / "after.keras")
    assert_same_state(model, ksf.load_model(tmp_path / "after.keras"))


@pytest.mark.parametrize("value, legacy", [("1", True), ("true", True), ("True", True), ("0", False), ("yes", False)])
def test_flavour_rule_is_tensorflows(monkeypatch, value, legacy):
    monkeypatch.setenv("TF_USE_LEGACY_KERAS", value)
    assert ksf.legacy_keras_requested() is legacy


def test_tf_keras_models_go_to_tf_keras(tmp_path, monkeypatch):
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras.Sequential([tf_keras.layers.Dense(3, input_shape=(2,))])
    model.compile(optimizer="adam", loss="mse")
    model.train_on_batch(np.ones((2, 2)), np.ones((2, 3)))
    for name in ("m.keras", "m.h5", "saved_model"):
        path = tmp_path / name
        ksf.save_model(model, path)
        monkeypatch.setenv("TF_USE_LEGACY_KERAS", "1")
        loaded = ksf.load_model(path)
        monkeypatch.delenv("TF_USE_LEGACY_KERAS")
        assert isinstance(loaded, tf_keras.Model)
        for a, b in zip(model.weights, loaded.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert (tmp_path / "saved_model" / "variables" / "variables.index").exists()


# ---------------------------------------------------------------------------------------------
# Signatures, overwrite rules and delegation, per flavour


def _tf_keras_model():
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras.Sequential([tf_keras.layers.Dense(3, input_shape=(2,))])
    model.compile(optimizer="adam", loss="mse")
    model.train_on_batch(np.ones((2, 2)), np.ones((2, 3)))
    return model


def test_refusal_is_both_what_users_and_stock_code_catch(model, tmp_path, no_terminal):
    path = tmp_path / "m.keras"
    path.write_bytes(b"previous")
    with pytest.raises(ksf.OverwriteRefused) as e:
        ksf.save_model(model, path, overwrite=False)
    assert isinstance(e.value, FileExistsError) and isinstance(e.value, EOFError)
    assert e.value.filename == str(path) and "overwrite=True" in str(e.value)


def _existing(tmp_path, name: str) -> tuple[str, list]:
    """A path to save to whose previous files exist: (path, the files that exist)."""
    base = tmp_path / name
    if name.endswith((".keras", ".h5")):
        base.write_bytes(b"previous")
        return str(base), [base]
    if name == "ckpt":  # a TF checkpoint: `ckpt` itself never exists
        made = [tmp_path / "ckpt.index", tmp_path / "ckpt.data-00000-of-00001"]
    else:  # a SavedModel directory
        base.mkdir()
        made = [base / "saved_model.pb"]
    for f in made:
        f.write_bytes(b"previous")
    return str(base), made


@pytest.mark.parametrize(
    "flavour, call, name",
    [
        ("keras3", "save_model", "m.keras"),
        ("keras3", "save_model", "m.h5"),
        ("keras3", "save_weights", "m.weights.h5"),
        ("tf_keras", "save_model", "m.keras"),
        ("tf_keras", "save_model", "m.h5"),
        ("tf_keras", "save_model", "saved_model"),
        ("tf_keras", "save_weights", "m.h5"),
        ("tf_keras", "save_weights", "ckpt"),
    ],
)
def test_overwrite_false_checks_what_stock_checks(model, tmp_path, no_terminal, flavour, call, name):
    """Without an answer to stock's prompt: where stock refuses (EOFError), we refuse and leave
    every previous file as it was; where stock does not ask, neither do we."""
    m = model if flavour == "keras3" else _tf_keras_model()
    (tmp_path / "stock").mkdir()
    (tmp_path / "ours").mkdir()
    stock_path, _ = _existing(tmp_path / "stock", name)
    path, previous = _existing(tmp_path / "ours", name)
    try:
        (m.save if call == "save_model" else m.save_weights)(stock_path, overwrite=False)
        stock_refused = False
    except EOFError:
        stock_refused = True
    if not stock_refused:
        getattr(ksf, call)(m, path, overwrite=False)
        return
    with pytest.raises(ksf.OverwriteRefused):
        getattr(ksf, call)(m, path, overwrite=False)
    for f in previous:
        assert f.read_bytes() == b"previous", f"{f} was overwritten"


def test_fourth_positional_argument_is_the_flavours_own(model, tmp_path):
    # Keras 3: save_model(model, filepath, overwrite, zipped)
    ksf.save_model(model, tmp_path / "ours_dir", True, False)
    keras.saving.save_model(model, tmp_path / "stock_dir", True, False)
    assert (tmp_path / "ours_dir").is_dir()
    assert sorted(os.listdir(tmp_path / "ours_dir")) == sorted(os.listdir(tmp_path / "stock_dir"))
    # Keras 3: save_weights(model, filepath, overwrite, max_shard_size)
    ksf.save_weights(model, tmp_path / "ours.weights.json", True, 0.00001)
    keras.saving.save_weights(model, tmp_path / "stock.weights.json", True, 0.00001)
    ours = sorted(n.replace("ours", "") for n in os.listdir(tmp_path) if n.startswith("ours") and "weights" in n)
    theirs = sorted(n.replace("stock", "") for n in os.listdir(tmp_path) if n.startswith("stock") and "weights" in n)
    assert ours == theirs and len(ours) > 1
    # tf_keras: save_model(model, path, overwrite, save_format), Model.save_weights(path, overwrite, save_format)
    m = _tf_keras_model()
    ksf.save_model(m, tmp_path / "tfk", True, "h5")
    assert h5py_signature(tmp_path / "tfk")
    ksf.save_weights(m, tmp_path / "tfk_w", True, "h5")
    assert h5py_signature(tmp_path / "tfk_w")
    with pytest.raises(TypeError, match="multiple values"):
        ksf.save_model(model, tmp_path / "x.keras", True, True, zipped=True)
    with pytest.raises(TypeError, match="positional"):
        ksf.save_model(model, tmp_path / "x.keras", True, True, True)


def h5py_signature(path) -> bool:
    return path.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"


def test_graph_mode_models_load_weights_with_stocks_keywords(tmp_path):
    """tf_keras' `Model.load_weights` passes by_name, skip_mismatch and options=None; a graph-mode
    (training_v1) model's own load_weights takes no options: routing through us must not break it."""
    tf_keras = pytest.importorskip("tf_keras")
    import tensorflow as tf
    from tf_keras.src.engine import training_v1

    path = str(tmp_path / "w.h5")
    with tf.Graph().as_default():
        inputs = tf_keras.layers.Input((2,))
        model = tf_keras.models.Model(inputs, tf_keras.layers.Dense(3)(inputs))
        assert isinstance(model, training_v1.Model)
        saved = model.get_weights()
        ksf.save_weights(model, path)
        model.set_weights([np.zeros_like(w) for w in saved])
        ksf.load_weights(model, path, by_name=False, skip_mismatch=False, options=None)
        for a, b in zip(saved, model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_delegation_reaches_stock_even_when_stock_is_routed_through_us(model, tmp_path, monkeypatch):
    """A user (or `install()`) may point stock's entry points at ours: delegating must not loop."""
    from keras.src.saving import saving_api

    for name in ("save_model", "load_model", "save_weights", "load_weights"):
        monkeypatch.setattr(saving_api, name, getattr(ksf, name))
    ksf.save_model(model, tmp_path / "m.h5")
    loaded = ksf.load_model(tmp_path / "m.h5", compile=False)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_keras_without_a_hook_we_use_goes_to_stock_with_one_warning(model_zoo, tmp_path, monkeypatch):
    """A Keras release lacking (or having changed) a private piece the fast paths call: saves and
    loads go to stock, and one warning names the piece."""
    import warnings

    from kerassave_fast.keras3 import hooks

    assert hooks.missing() == (), "the installed Keras must have every hook"
    monkeypatch.setattr(hooks, "missing", lambda: ("keras.src.saving.saving_lib._save_state is missing",))
    monkeypatch.setattr(hooks, "_warned", threading.Event())

    def not_ours(*args, **kwargs):
        raise AssertionError("the fast path ran")

    monkeypatch.setattr(keras_zip, "prepare_save", not_ours)
    monkeypatch.setattr(keras_zip, "load", not_ours)
    model = model_zoo("optimizer_adam")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ksf.save_model(model, tmp_path / "m.keras")
        loaded = ksf.load_model(tmp_path / "m.keras")
    ours = [str(w.message) for w in caught if "kerassave_fast" in str(w.message)]
    assert len(ours) == 1 and "_save_state is missing" in ours[0] and "go to stock Keras" in ours[0], ours
    assert_same_state(model, loaded)


@keras.saving.register_keras_serializable(package="kerassave_fast_tests")
class CompilesItsOwnWay(keras.Model):
    """A subclassed model with its own `compile` (as GANs have), which may read its weights: our
    build gives its variables their initial values before compiling it as stock does."""

    inits = 0  # how many were made: a load makes one, as stock's does

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        CompilesItsOwnWay.inits += 1
        self.hidden = keras.layers.Dense(3)
        self.out = keras.layers.Dense(2)

    def call(self, x):
        return self.out(self.hidden(x))

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)


def _trained_and_saved(model, tmp_path):
    """`model` (5 inputs) compiled with Adam, one epoch on ones, saved: its `.keras` path."""
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 5)), np.ones((4, model(np.ones((1, 5))).shape[-1])), verbose=0)
    path = tmp_path / "m.keras"
    ksf.save_model(model, path)
    return path


def test_a_model_that_compiles_its_own_way_is_built_once_and_named_as_stock(tmp_path):
    model = CompilesItsOwnWay()
    path = _trained_and_saved(model, tmp_path)
    names, inits = {}, {}
    for name, load in (("stock", keras.saving.load_model), ("ours", ksf.load_model)):
        keras.backend.clear_session()
        CompilesItsOwnWay.inits = 0
        with pytest.warns(UserWarning, match="`compile\\(\\)` was not called"):  # stock's, for its own compile
            loaded = load(path)
        names[name] = [layer.name for layer in loaded.layers] + [v.path for v in loaded.weights]
        inits[name] = CompilesItsOwnWay.inits
    assert names["ours"] == names["stock"]
    assert inits == {"stock": 1, "ours": 1}
    for expected, actual in zip(model.weights, loaded.weights, strict=True):
        assert np.array_equal(np.asarray(expected), np.asarray(actual))


@keras.saving.register_keras_serializable(package="kerassave_fast_tests")
class ReadsItsWeightsToCompile(keras.Model):
    """Reads its weights in `compile_from_config`: they must hold what stock's build gives them."""

    seen = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x)

    def compile_from_config(self, config):
        ReadsItsWeightsToCompile.seen = [np.array(w) for w in self.weights]
        super().compile_from_config(config)


def test_a_model_reading_its_weights_to_compile_sees_stocks_initial_values(tmp_path):
    model = ReadsItsWeightsToCompile()
    path = _trained_and_saved(model, tmp_path)
    seen = {}
    for name, load in (("stock", keras.saving.load_model), ("ours", ksf.load_model)):
        keras.backend.clear_session()
        keras.utils.set_random_seed(7)
        loaded = load(path)
        seen[name] = ReadsItsWeightsToCompile.seen
        assert_same_state(model, loaded)
    assert len(seen["ours"]) == 2 and not np.array_equal(seen["ours"][0], np.asarray(model.weights[0]))
    for ours, stock in zip(seen["ours"], seen["stock"], strict=True):
        assert np.array_equal(ours, stock)


@keras.saving.register_keras_serializable(package="kerassave_fast_tests")
class FailsToCompile(keras.Model):
    """Its `compile_from_config` raises: a load fails as stock's does, having run it once."""

    calls = 0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)

    def compile_from_config(self, config):
        FailsToCompile.calls += 1
        raise RuntimeError("this model cannot compile")


def test_a_model_failing_its_own_compile_fails_the_load_as_stock_having_run_it_once(tmp_path):
    path = _trained_and_saved(FailsToCompile(), tmp_path)
    for load in (keras.saving.load_model, ksf.load_model):
        FailsToCompile.calls = 0
        with pytest.raises(RuntimeError, match="this model cannot compile"):
            load(path)
        assert FailsToCompile.calls == 1


def test_a_rebuilt_model_draws_stocks_seeds(tmp_path):
    """A compiled model inside the saved one makes our build give up and build the stock way: that
    build draws the seeds stock's draws (Dropout's), so the next training step equals stock's."""
    x, y = np.random.default_rng(0).random((16, 3), np.float32), np.random.default_rng(1).random((16, 2), np.float32)
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(8), keras.layers.Dropout(0.5), keras.layers.Dense(2)]
    inner = keras.Sequential([keras.Input((3,)), *layers])
    inner.compile(optimizer="adam", loss="mse")
    outer = keras.Sequential([keras.Input((3,)), inner])
    outer.compile(optimizer="adam", loss="mse")
    outer.fit(x, y, verbose=0)
    path = tmp_path / "m.keras"
    ksf.save_model(outer, path)
    stepped = {}
    for name, load in (("stock", keras.saving.load_model), ("ours", ksf.load_model)):
        keras.backend.clear_session()
        keras.utils.set_random_seed(5)
        loaded = load(path)
        loaded.train_on_batch(x, y)
        stepped[name] = [np.asarray(w) for w in loaded.weights] + [random.random()]
    for ours, stock in zip(stepped["ours"], stepped["stock"], strict=True):
        np.testing.assert_array_equal(ours, stock)


def test_a_child_forked_during_a_save_has_the_garbage_collector_on():
    """The GC pause of a save or load in progress is the parent's: a forked child has none running."""
    from kerassave_fast import api

    was = gc.get_threshold()
    assert gc.isenabled() and was[0] > 0
    with api._no_gc_pauses():
        pid = os.fork()
        if pid == 0:
            os._exit(0 if gc.get_threshold() == was and api._gc_pausers == 0 else 1)
        assert gc.get_threshold() == (0, *was[1:])
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert gc.isenabled() and gc.get_threshold() == was


def test_a_child_forked_inside_a_save_counts_only_its_own_pauses():
    from kerassave_fast import api

    with api._no_gc_pauses():
        pid = os.fork()
    if pid == 0:
        left = api._gc_pausers
        with api._no_gc_pauses():
            inside = gc.get_threshold()[0]
        os._exit(0 if left == 0 and inside == 0 and gc.get_threshold()[0] > 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


class _SavesText(keras.layers.Layer):
    """Stores a string or bytes beside its variable, which stock's store refuses."""

    def __init__(self, text=b"", **kwargs):
        super().__init__(**kwargs)
        self.text = text

    def build(self, input_shape):
        self.weight = self.add_weight(shape=(2,), initializer="ones")

    def call(self, x):
        return x

    def get_config(self):
        return super().get_config()

    def save_own_variables(self, store):
        store["0"] = self.weight
        store["tag"] = self.text


@pytest.mark.parametrize("text", [b"hello", "hello"])
@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_a_string_entry_is_refused_as_stock_refuses_it(tmp_path, text, suffix):
    """Stock raises `ValueError: Invalid dtype` (ours saved bytes, and raised TypeError for str)."""
    inputs = keras.Input((2,))
    model = keras.Model(inputs, _SavesText(text)(inputs))
    save_ours, save_stock = (
        (ksf.save_weights, keras.Model.save_weights)
        if suffix == ".weights.h5"
        else (ksf.save_model, keras.saving.save_model)
    )
    with pytest.raises(ValueError, match="Invalid dtype") as stock:
        save_stock(model, tmp_path / f"stock{suffix}")
    with pytest.raises(ValueError, match="Invalid dtype") as ours:
        save_ours(model, tmp_path / f"ours{suffix}")
    assert str(ours.value) == str(stock.value)
    assert not (tmp_path / f"ours{suffix}").exists()


@pytest.mark.parametrize("call", ["save_model", "save_weights", "load_weights"])
def test_a_non_model_raises_what_stock_raises_and_says_so(tmp_path, call):
    path = str(tmp_path / ("m.keras" if call == "save_model" else "m.weights.h5"))
    with pytest.raises(Exception) as stock:
        getattr(keras.saving, call)("notamodel", path)
    with pytest.raises(type(stock.value), match="must be a Keras model"):
        getattr(ksf, call)("notamodel", path)
