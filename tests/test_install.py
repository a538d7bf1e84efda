"""`install()`: stock's own entry points routed through us, and put back by `uninstall()`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest

import kerassave_fast as ksf
from conftest import assert_same_state
from kerassave_fast.formats import keras_zip, weights_file


@pytest.fixture
def routed():
    ksf.install()
    yield
    ksf.uninstall()


@pytest.fixture
def calls(monkeypatch):
    """Counts what reached our fast paths."""
    seen = []
    for module, name in (
        (keras_zip, "prepare_save"),
        (keras_zip, "load"),
        (weights_file, "prepare_save"),
        (weights_file, "load"),
    ):
        label = f"{module.__name__.rsplit('.', 1)[-1]}.{name.removeprefix('prepare_')}"
        real = getattr(module, name)

        def spy(*args, _real=real, _label=label, **kwargs):
            seen.append(_label)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return seen


def test_stock_entry_points_reach_our_fast_paths(model_zoo, tmp_path, routed, calls):
    model = model_zoo("optimizer_adam")
    model.save(tmp_path / "a.keras")
    keras.saving.save_model(model, tmp_path / "b.keras")
    keras.models.save_model(model, tmp_path / "c.keras")
    loaded = keras.saving.load_model(tmp_path / "a.keras")
    assert_same_state(model, loaded)
    assert_same_state(model, keras.models.load_model(tmp_path / "b.keras"))
    model.save_weights(tmp_path / "w.weights.h5")
    loaded.load_weights(tmp_path / "w.weights.h5")
    assert calls == ["keras_zip.save"] * 3 + ["keras_zip.load"] * 2 + ["weights_file.save", "weights_file.load"]


def test_model_checkpoint_callback_is_routed(model_zoo, tmp_path, routed, calls):
    model = model_zoo("seed_example")
    x, y = np.ones((4, 3), "float32"), np.ones((4, 5), "float32")
    callback = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch{epoch}.keras"))
    model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    assert calls.count("keras_zip.save") == 2
    assert_same_state(model, keras.saving.load_model(tmp_path / "epoch2.keras"))


def test_uninstall_puts_everything_back(routed):
    from keras.src.saving import saving_api

    originals = (keras.saving.save_model, keras.Model.save, saving_api.load_model)
    assert all(hasattr(f, "__kerassave_fast_original__") for f in originals)
    ksf.install()  # idempotent
    ksf.uninstall()
    assert not ksf.installed()
    assert keras.saving.save_model is saving_api.save_model
    for f in (keras.saving.save_model, keras.models.load_model, keras.Model.save, keras.Model.load_weights):
        assert not hasattr(f, "__kerassave_fast_original__"), f
    ksf.install()


def test_install_and_uninstall_from_many_threads():
    def toggle():
        for _ in range(20):
            ksf.install()
            ksf.uninstall()

    threads = [threading.Thread(target=toggle) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not ksf.installed()
    assert not hasattr(keras.saving.save_model, "__kerassave_fast_original__")


def test_bad_calls_raise_stocks_type_error(routed, model_zoo, tmp_path):
    with pytest.raises(TypeError):
        model_zoo("seed_example").save(tmp_path / "m.keras", True, None, "extra")


def test_tf_keras_load_model_stays_tf_keras(tmp_path, routed, monkeypatch):
    tf_keras = pytest.importorskip("tf_keras")
    monkeypatch.delenv("TF_USE_LEGACY_KERAS", raising=False)
    model = tf_keras.Sequential([tf_keras.layers.Dense(3, input_shape=(2,))])
    model.save(tmp_path / "m.h5")
    loaded = tf_keras.models.load_model(tmp_path / "m.h5")
    assert isinstance(loaded, tf_keras.Model)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _with_environment_variable(code: str) -> list[str]:
    env = {**os.environ, "KERASSAVE_FAST": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_environment_variable_installs_at_import():
    code = (
        "import keras, kerassave_fast; "
        "print(kerassave_fast.installed(), hasattr(keras.Model.save, '__kerassave_fast_original__'))"
    )
    assert _with_environment_variable(code) == ["True", "True"]


def test_environment_variable_installs_once_keras_is_imported_and_not_before():
    """A process that never imports Keras (the command line's `inspect` and `verify`) does not
    import Keras and TensorFlow for the routing; the first `import keras` brings it, tf_keras too."""
    code = (
        "import sys, kerassave_fast\n"
        "print(kerassave_fast.installed(), any(m in sys.modules for m in ('keras', 'tensorflow', 'tf_keras')))\n"
        "import keras\n"
        "print(kerassave_fast.installed(), hasattr(keras.Model.save, '__kerassave_fast_original__'))\n"
        "print(keras.saving.save_model.__kerassave_fast_original__.__module__, type(keras.__loader__).__name__)\n"
        "import tf_keras\n"
        "print(hasattr(tf_keras.Model.save, '__kerassave_fast_original__'))"
    )
    expected = ["False", "False", "True", "True", "keras.src.saving.saving_api", "SourceFileLoader", "True"]
    assert _with_environment_variable(code) == expected


def test_uninstall_cancels_the_environment_variable_s_pending_install():
    code = "import kerassave_fast; kerassave_fast.uninstall(); import keras; print(kerassave_fast.installed())"
    assert _with_environment_variable(code) == ["False"]


@pytest.mark.parametrize(
    "first_use",
    ["kerassave_fast.load_model(sys.argv[1])", "from kerassave_fast import save_model", "kerassave_fast.install()"],
)
def test_the_environment_variable_s_install_when_kerassave_fast_imports_keras_first(tmp_path, first_use):
    """kerassave_fast's own first import of Keras (its API's, or `install()`'s) runs the pending
    install inside it: it completes, routes once (no wrapper of a wrapper), and warns of nothing."""
    path = tmp_path / "m.keras"
    keras.saving.save_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), path)
    code = (
        "import sys, warnings; warnings.simplefilter('error')\n"
        "import kerassave_fast\n"
        f"{first_use}\n"
        "import keras\n"
        "original = keras.Model.save.__kerassave_fast_original__\n"
        "print(kerassave_fast.installed(), original.__module__, hasattr(original, '__kerassave_fast_original__'))"
    )
    env = {**os.environ, "KERASSAVE_FAST": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "keras.src.models.model", "False"]


def test_keras_own_saving_tests_pass_with_install():
    """Keras 3's own `saving_api_test.py` (a copy of the installed release's), with `install()` in effect."""
    env = {**os.environ, "KSF_ROUTE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_USE_LEGACY_KERAS", None)
    suite = os.path.join(os.path.dirname(__file__), "stock_suites", "keras3")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", suite], env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-4000:]
    assert "kerassave_fast.install() in effect: True" in run.stdout
