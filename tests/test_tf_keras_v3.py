"""tf_keras' own `.keras` zip (tf_keras/src/saving/saving_lib.py) through our zip and tensor path:
the weights member byte-identical to stock's, stock loads ours and we load stock's, bitwise."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tf_keras
from tf_keras.src.saving import saving_lib as tf_keras_saving_lib

import kerassave_fast as ksf

sys.path.insert(0, str(Path(__file__).parent))
import tf_keras_models


@pytest.fixture(scope="module", params=tf_keras_models.MODELS, ids=lambda f: f.__name__)
def saved(request, tmp_path_factory):
    model = tf_keras_models.trained(request.param)
    base = tmp_path_factory.mktemp(f"tfk_v3_{request.param.__name__}")
    stock, ours = base / "stock.keras", base / "ours.keras"
    model.save(stock)
    ksf.save_model(model, ours)
    return model, stock, ours


def _stock_reads_it(model) -> bool:
    """Stock tf_keras cannot load bfloat16 variables from its own `.keras` (h5py stored them as
    untagged opaque values; "No cast function available"): ours does."""
    return not any(v.dtype == "bfloat16" for v in model.weights)


def _stock_load(model, path, **kwargs):
    if _stock_reads_it(model):
        return tf_keras.models.load_model(path, **kwargs)
    with pytest.raises(ValueError, match="No cast function"):
        tf_keras.models.load_model(path, **kwargs)
    return None


def test_the_zip_is_stocks_but_for_timestamps(saved):
    _, stock, ours = saved
    with zipfile.ZipFile(stock) as s, zipfile.ZipFile(ours) as o:
        assert s.namelist() == o.namelist()
        assert s.read("model.weights.h5") == o.read("model.weights.h5")
        assert s.read("config.json") == o.read("config.json")
        for a, b in zip(s.infolist(), o.infolist(), strict=True):
            assert (a.compress_type, a.external_attr, a.file_size) == (b.compress_type, b.external_attr, b.file_size)


@pytest.mark.parametrize("reader", ["stock", "ours"])
@pytest.mark.parametrize("writer", ["stock", "ours"])
def test_loads_restore_weights_and_optimizer_state(saved, writer, reader):
    model, stock, ours = saved
    path = {"stock": stock, "ours": ours}[writer]
    loaded = _stock_load(model, path) if reader == "stock" else ksf.load_model_as("tf_keras", path)
    if loaded is not None:
        tf_keras_models.assert_same_state(model, loaded)


def test_our_paths_run_and_the_next_step_is_the_originals(saved, monkeypatch, tmp_path):
    model, stock, _ = saved

    def not_stock(*args, **kwargs):
        raise AssertionError("stock's tf_keras saving_lib was called")

    monkeypatch.setattr(tf_keras_saving_lib, "save_model", not_stock)
    monkeypatch.setattr(tf_keras_saving_lib, "load_model", not_stock)
    ksf.save_model(model, tmp_path / "again.keras")
    ours = ksf.load_model_as("tf_keras", tmp_path / "again.keras")
    monkeypatch.undo()
    # The reference: the same model trained again from scratch (deterministic), one step further.
    make = next(m for m in tf_keras_models.MODELS if stock.parent.name.startswith(f"tfk_v3_{m.__name__}"))
    reference = tf_keras_models.trained(make)
    x, y = tf_keras_models.batch(model, seed=1)
    ours.train_on_batch(x, y)
    reference.train_on_batch(x, y)
    tf_keras_models.assert_same_state(reference, ours)


def test_compile_false_and_stock_refusals(saved, tmp_path):
    model, stock, _ = saved
    ours = ksf.load_model_as("tf_keras", stock, compile=False)
    assert ours.optimizer is None
    for a, b in zip(model.weights, ours.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    theirs = _stock_load(model, stock, compile=False)
    assert theirs is None or theirs.optimizer is None
    with pytest.raises(ValueError, match="not supported with the native TF-Keras format") as stock_error:
        model.save(tmp_path / "s.keras", include_optimizer=False)
    with pytest.raises(ValueError) as our_error:
        ksf.save_model(model, tmp_path / "o.keras", include_optimizer=False)
    assert str(our_error.value) == str(stock_error.value)


def test_a_compressed_tf_keras_file_loads_in_stock(saved, tmp_path):
    model, _, _ = saved
    ksf.save_model(model, tmp_path / "gz.keras", compression="gzip", checksum=True)
    if (theirs := _stock_load(model, tmp_path / "gz.keras")) is not None:
        tf_keras_models.assert_same_state(model, theirs)
    tf_keras_models.assert_same_state(model, ksf.load_model_as("tf_keras", tmp_path / "gz.keras"))


def test_stock_saves_after_ours_are_unchanged(saved, tmp_path):
    """Our saves record tf_keras' base layers and optimizers by reference through a wrapper of
    their `save_own_variables`; stock's own saves still get stock's method."""
    from tf_keras.src.engine.base_layer import Layer

    model, stock, _ = saved
    assert hasattr(Layer.save_own_variables, "recording_original")  # ours ran (fixture)
    model.save(tmp_path / "again.keras")
    with zipfile.ZipFile(stock) as before, zipfile.ZipFile(tmp_path / "again.keras") as after:
        assert before.read("model.weights.h5") == after.read("model.weights.h5")


def test_the_keras_format_at_another_suffix_is_stocks_error(saved, tmp_path):
    """Found by tf_keras' own saving_lib_test.py: stock refuses `save_format="keras_v3"` for a path
    that does not end in `.keras`; so do we, with its message, and nothing is written."""
    model, _, _ = saved
    path = tmp_path / "m.notkeras"
    with pytest.raises(ValueError, match="Invalid `filepath` argument"):
        ksf.save_model(model, path, save_format="keras_v3")
    assert not path.exists()


def test_an_aligned_tf_keras_file_loads_in_stock_and_mapped(saved, tmp_path):
    model, _, _ = saved
    path = tmp_path / "aligned.keras"
    ksf.save_model(model, path, aligned=True)
    loaded = _stock_load(model, path)
    if loaded is not None:
        tf_keras_models.assert_same_state(model, loaded)
    mapped = ksf.load_model_as("tf_keras", path, mmap=True)
    ksf.verification(mapped).result(60)
    tf_keras_models.assert_same_state(model, mapped)
    x, y = tf_keras_models.batch(model, seed=1)
    before = path.read_bytes()
    copied = ksf.load_model_as("tf_keras", path)
    copied.train_on_batch(x, y)
    mapped.train_on_batch(x, y)
    tf_keras_models.assert_same_state(copied, mapped)
    assert path.read_bytes() == before


@tf_keras.utils.register_keras_serializable("kerassave_fast_tests")
class _SwappedIn(tf_keras.layers.Dense):
    """Stores a kernel swapped in through its base class' `save_own_variables`, then restores it."""

    def save_own_variables(self, store):
        live = self.kernel.numpy()
        self.kernel.assign(np.zeros_like(live))
        super().save_own_variables(store)
        self.kernel.assign(live)


def test_a_variable_changed_once_stored_is_saved_as_stored(tmp_path):
    """The base class' `save_own_variables` hands us the variable itself: it is snapshot when
    stored, as stock's store copies it then, not after the walk (when it is restored)."""
    model = tf_keras.Sequential([_SwappedIn(2, kernel_initializer="ones", input_shape=(3,))])
    ksf.save_model(model, tmp_path / "ours.keras")
    model.save(tmp_path / "stock.keras")
    with zipfile.ZipFile(tmp_path / "ours.keras") as o, zipfile.ZipFile(tmp_path / "stock.keras") as s:
        assert o.read("model.weights.h5") == s.read("model.weights.h5")
    assert np.all(model.layers[0].kernel.numpy() == 1)
