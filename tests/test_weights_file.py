"""`save_weights` / `load_weights`: `.weights.h5` files byte-identical to stock's, and `.keras` weights."""

from __future__ import annotations

import keras
import pytest

import kerassave_fast as ksf
from conftest import assert_same_state


def _fresh_copy(model):
    """The same architecture and compile state, other values: a target for load_weights."""
    clone = keras.models.clone_model(model)
    clone.compile(optimizer=type(model.optimizer).from_config(model.optimizer.get_config()), loss="mse")
    clone.optimizer.build(clone.trainable_variables)
    return clone


@pytest.mark.parametrize("name", ["seed_example", "low_precision", "embedding_lstm", "optimizer_rmsprop"])
def test_weights_file_is_stocks_byte_for_byte(model_zoo, tmp_path, name):
    model = model_zoo(name)
    ours, stock = tmp_path / "ours.weights.h5", tmp_path / "stock.weights.h5"
    ksf.save_weights(model, ours)
    model.save_weights(stock)
    assert ours.read_bytes() == stock.read_bytes()


@pytest.mark.parametrize("name", ["seed_example", "low_precision", "optimizer_sgd_momentum"])
@pytest.mark.parametrize("source", ["ours", "stock"])
def test_load_weights_round_trips(model_zoo, tmp_path, name, source):
    model = model_zoo(name)
    path = tmp_path / "w.weights.h5"
    (ksf.save_weights if source == "ours" else keras.saving.save_weights)(model, path)
    for load in (ksf.load_weights, keras.saving.load_weights):
        target = _fresh_copy(model)
        load(target, path)
        assert_same_state(model, target)


def test_load_weights_from_a_keras_file(model_zoo, tmp_path):
    model = model_zoo("low_precision")
    path = tmp_path / "m.keras"
    keras.saving.save_model(model, path)
    target = _fresh_copy(model)
    ksf.load_weights(target, path)
    assert_same_state(model, target)


@pytest.mark.parametrize("name, kwargs", [("w.weights.h5", {}), ("w.weights.json", {"max_shard_size": 1})])
def test_mismatched_weights_fail_like_stock(model_zoo, tmp_path, name, kwargs):
    model = model_zoo("seed_example")
    path = tmp_path / name
    ksf.save_weights(model, path, **kwargs)
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(6), keras.layers.Softmax()])
    with pytest.raises(ValueError) as stock:
        keras.saving.load_weights(other, path)
    with pytest.raises(ValueError) as ours:
        ksf.load_weights(other, path)
    assert str(ours.value).split("\n")[0] == str(stock.value).split("\n")[0]
    with pytest.warns(UserWarning, match="could not be loaded"):
        ksf.load_weights(other, path, skip_mismatch=True)


def test_unbuilt_models_are_refused(tmp_path):
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not yet been built"):
        ksf.save_weights(model, tmp_path / "w.weights.h5")
    with pytest.raises(ValueError, match="not yet been built"):
        ksf.load_weights(model, tmp_path / "w.weights.h5")


def test_other_weight_files_go_to_stock(model_zoo, tmp_path):
    model = model_zoo("seed_example")
    with pytest.raises(ValueError, match=r"\.weights\.h5"):
        ksf.save_weights(model, tmp_path / "w.h5")
    with pytest.warns(UserWarning, match="requires `\\*.json`"):  # stock renames it, warning
        ksf.save_weights(model, tmp_path / "w.weights.h5", max_shard_size=1)
    target = _fresh_copy(model)
    ksf.load_weights(target, tmp_path / "w.weights.json")
    assert_same_state(model, target)
