"""Sharded weights (`save_weights(..., max_shard_size=...)` to a `.weights.json`): the map and every
shard byte-identical to stock's, loaded by our path from ours and stock's, stock's errors (a
mismatched model: test_weights_file.py)."""

from __future__ import annotations

import functools
import json
import os
import re
import warnings

import h5py
import keras
import numpy as np
import pytest
from keras.src.saving import saving_lib

import kerassave_fast as ksf
from conftest import assert_same_state


def _fresh_copy(model):
    clone = keras.models.clone_model(model)
    clone.compile(optimizer=type(model.optimizer).from_config(model.optimizer.get_config()), loss="mse")
    clone.optimizer.build(clone.trainable_variables)
    return clone


def _files(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def _largest_tensor_gb(model) -> float:
    variables = list(model.weights) + list(model.optimizer.variables)
    return max(np.asarray(v.numpy()).nbytes for v in variables) / 1024**3


def _refuse(*args, **kwargs):
    raise AssertionError("stock's reader was used")


@pytest.mark.parametrize("name", ["convnet", "low_precision", "embedding_lstm", "optimizer_adamw"])
@pytest.mark.parametrize("shards_of", [1, 2.5, None])  # shards of about that many largest tensors; None: 1 GB
def test_sharded_files_are_stocks_byte_for_byte(model_zoo, tmp_path, name, shards_of):
    model = model_zoo(name)
    size = 1 if shards_of is None else _largest_tensor_gb(model) * shards_of
    (tmp_path / "ours").mkdir()
    (tmp_path / "stock").mkdir()
    ksf.save_weights(model, tmp_path / "ours" / "m.weights.json", max_shard_size=size)
    keras.saving.save_weights(model, tmp_path / "stock" / "m.weights.json", max_shard_size=size)
    ours, stock = _files(tmp_path / "ours"), _files(tmp_path / "stock")
    assert list(ours) == list(stock)
    assert (len(ours) > 3) == (shards_of is not None)  # small shards: several of them
    for file in stock:
        assert ours[file] == stock[file], file
    if shards_of == 1:
        assert any(
            isinstance(v, list) and len(v) > 1 for v in json.loads(ours["m.weights.json"])["weight_map"].values()
        )


@pytest.mark.parametrize("name", ["convnet", "low_precision", "optimizer_sgd_momentum"])
@pytest.mark.parametrize("source", ["ours", "stock"])
@pytest.mark.parametrize("mmap", [False, True])
def test_sharded_loads_are_ours_and_bitwise(model_zoo, tmp_path, name, source, mmap, monkeypatch):
    model = model_zoo(name)
    path = tmp_path / "m.weights.json"
    save = ksf.save_weights if source == "ours" else keras.saving.save_weights
    save(model, path, max_shard_size=_largest_tensor_gb(model) * 2)
    stock_target = _fresh_copy(model)
    keras.saving.load_weights(stock_target, path)
    assert_same_state(model, stock_target)
    target = _fresh_copy(model)
    monkeypatch.setattr(saving_lib, "load_weights_only", _refuse)  # a load that passes went through ours
    ksf.load_weights(target, path, mmap=mmap)
    monkeypatch.undo()
    assert_same_state(model, target)
    # The loaded variables own their values: a training step leaves the files as they were.
    before = _files(tmp_path)
    x = np.ones((2, *model.inputs[0].shape[1:]), model.inputs[0].dtype)
    target.train_on_batch(x, target.predict(x, verbose=0))
    assert _files(tmp_path) == before


def test_aligned_shards_put_every_tensor_on_a_64_byte_boundary(model_zoo, tmp_path):
    model = model_zoo("convnet")
    path = tmp_path / "m.weights.json"
    ksf.save_weights(model, path, max_shard_size=_largest_tensor_gb(model) * 2, aligned=True)
    offsets = []
    for name in os.listdir(tmp_path):
        if name.endswith(".weights.h5"):
            with h5py.File(tmp_path / name, "r") as f:
                f.visititems(lambda _, o: offsets.append(o.id.get_offset()) if isinstance(o, h5py.Dataset) else None)
    assert len(offsets) > 2 and all(o % 64 == 0 for o in offsets if o is not None)
    target = _fresh_copy(model)
    keras.saving.load_weights(target, path)  # stock reads them
    assert_same_state(model, target)
    target = _fresh_copy(model)
    ksf.load_weights(target, path, mmap=True)
    assert_same_state(model, target)


def test_a_background_sharded_save_equals_a_blocking_one(model_zoo, tmp_path):
    model = model_zoo("convnet")
    size = _largest_tensor_gb(model) * 2
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ksf.save_weights(model, tmp_path / "a" / "m.weights.json", max_shard_size=size)
    handle = ksf.save_weights(model, tmp_path / "b" / "m.weights.json", max_shard_size=size, blocking=False)
    handle.result()
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_a_tensor_larger_than_a_shard_is_refused_as_stock_refuses_it(model_zoo, tmp_path):
    model = model_zoo("convnet")
    path = tmp_path / "m.weights.json"
    ksf.save_weights(model, path, max_shard_size=1)
    before = _files(tmp_path)
    too_small = _largest_tensor_gb(model) / 2
    with pytest.raises(ValueError) as ours:
        ksf.save_weights(model, path, max_shard_size=too_small)
    assert _files(tmp_path) == before  # refused before anything was written
    (tmp_path / "stock").mkdir()
    with pytest.raises(ValueError) as stock:
        keras.saving.save_weights(model, tmp_path / "stock" / "m.weights.json", max_shard_size=too_small)
    assert str(ours.value) == str(stock.value)


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: m["weight_map"].update({k: "../elsewhere.weights.h5" for k in m["weight_map"]}),
        lambda m: m["weight_map"].update({k: "missing_00009.weights.h5" for k in m["weight_map"]}),
        lambda m: m.update(weight_map=["not", "a", "map"]),
    ],
    ids=["outside", "missing", "not-a-map"],
)
def test_maps_stock_would_refuse_get_stocks_error(model_zoo, tmp_path, damage):
    model = model_zoo("seed_example")
    path = tmp_path / "w.weights.json"
    ksf.save_weights(model, path, max_shard_size=1)
    config = json.loads(path.read_text())
    damage(config)
    path.write_text(json.dumps(config))
    with pytest.raises(Exception) as stock:
        keras.saving.load_weights(_fresh_copy(model), path)
    with pytest.raises(Exception) as ours:
        ksf.load_weights(_fresh_copy(model), path)
    assert (type(ours.value), str(ours.value)) == (type(stock.value), str(stock.value))


def test_a_repeated_save_of_many_shards_reuses_every_shards_layout(model_zoo, tmp_path, monkeypatch):
    """One layout per shard is remembered, however many shards (the cache once held 8): the next
    save of the same model runs no h5py and still writes stock's files."""
    from kerassave_fast.formats import weights_h5

    model = model_zoo("convnet")
    size = _largest_tensor_gb(model)  # about one tensor per shard
    weights_h5._LAYOUTS.clear()
    (tmp_path / "first").mkdir()
    ksf.save_weights(model, tmp_path / "first" / "m.weights.json", max_shard_size=size)
    shards = len(os.listdir(tmp_path / "first")) - 1
    assert shards > 8
    monkeypatch.setattr(weights_h5, "write_skeleton", _refuse)
    (tmp_path / "ours").mkdir()
    (tmp_path / "stock").mkdir()
    ksf.save_weights(model, tmp_path / "ours" / "m.weights.json", max_shard_size=size)
    monkeypatch.undo()
    keras.saving.save_weights(model, tmp_path / "stock" / "m.weights.json", max_shard_size=size)
    assert _files(tmp_path / "ours") == _files(tmp_path / "stock")


def test_a_model_with_no_weights_gets_stocks_map(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Flatten()])
    (tmp_path / "ours").mkdir()
    (tmp_path / "stock").mkdir()
    ksf.save_weights(model, tmp_path / "ours" / "m.weights.json", max_shard_size=1)
    keras.saving.save_weights(model, tmp_path / "stock" / "m.weights.json", max_shard_size=1)
    assert _files(tmp_path / "ours") == _files(tmp_path / "stock")  # "total_size": 0, not 0.0


def _twins(model):
    """Two fresh copies of `model` in the same state (what a load leaves alone stays equal)."""
    a, b = _fresh_copy(model), _fresh_copy(model)
    for x, y in zip(a.weights + a.optimizer.variables, b.weights + b.optimizer.variables, strict=True):
        y.assign(x)
    return a, b


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("skip_mismatch", [False, True])
@pytest.mark.parametrize("damage", ["truncated", "unneeded"])
def test_a_damaged_shard_is_answered_as_stock_answers_it(model_zoo, tmp_path, damage, skip_mismatch, mmap):
    """Ours opened every shard the map names first, and raised libhdf5's `OSError` for a damaged
    one; stock opens a shard when a layer asks for it (and loads a model whose map names a damaged
    file no layer of it needs). With mmap=True too: stock's answer (its error, or a copying load),
    not a refusal of mmap=True for `.weights.json` files."""
    model = model_zoo("convnet")
    path = tmp_path / "m.weights.json"
    ksf.save_weights(model, path, max_shard_size=_largest_tensor_gb(model) * 2)
    if damage == "truncated":
        shard = tmp_path / "m_00001.weights.h5"
        shard.write_bytes(shard.read_bytes()[:3000])
    else:
        (tmp_path / "junk.weights.h5").write_bytes(b"not hdf5" * 100)
        config = json.loads(path.read_text())
        config["weight_map"]["/layers/gone/vars"] = "junk.weights.h5"
        path.write_text(json.dumps(config))

    def outcome(load, target):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                load(target, path, skip_mismatch=skip_mismatch)
            except Exception as e:
                return type(e), re.sub(r"0x[0-9a-f]+", "", str(e))
        return None, [re.sub(r"0x[0-9a-f]+", "", str(w.message)) for w in caught]

    ours_target, stock_target = _twins(model)
    stock = outcome(keras.saving.load_weights, stock_target)
    if damage == "unneeded":
        assert stock[0] is None
    assert outcome(functools.partial(ksf.load_weights, mmap=mmap), ours_target) == stock
    assert_same_state(stock_target, ours_target)


def test_a_sharded_save_handed_to_stock_never_rewrites_a_shard_a_mapped_model_reads(model_zoo, tmp_path, monkeypatch):
    """Stock writes the shards in place: truncating one a mapped model reads kills the process
    (SIGBUS). Refused before stock is called, for the map's path and for stock's `.weights.h5` one."""
    from kerassave_fast import api

    model = model_zoo("convnet")
    path = tmp_path / "m.weights.json"
    size = _largest_tensor_gb(model) * 2
    ksf.save_weights(model, path, max_shard_size=size, aligned=True)
    saved = _files(tmp_path)
    target = _fresh_copy(model)
    ksf.load_weights(target, path, mmap=True)
    called = []
    monkeypatch.setattr(api, "stock", lambda module, name: lambda *a, **k: called.append(name))
    for where in (path, tmp_path / "m.weights.h5"):  # `objects_to_skip`, or the renaming: stock's
        with pytest.raises(ksf.KerasSaveError, match="mmap=True"):
            ksf.save_weights(target, where, max_shard_size=size, objects_to_skip=[])
    assert called == [] and _files(tmp_path) == saved
    ksf.save_weights(target, tmp_path / "other.weights.json", max_shard_size=size, objects_to_skip=[])
    assert called == ["save_weights"]
    monkeypatch.undo()
    assert_same_state(model, target)
