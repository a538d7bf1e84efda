"""Interop with stock Keras 3, bitwise, in all three directions: ours->stock, stock->ours, ours->ours."""

from __future__ import annotations

import io
import time
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import kerassave_fast as ksf
from conftest import CUSTOM_OBJECTS, MODELS, _batch, assert_same_state, h5_tree, member

WEIGHTS = "model.weights.h5"


@pytest.fixture(scope="module")
def saved(model_zoo, tmp_path_factory):
    """(model, our file, stock's file) per model name, saved once."""
    cache = {}

    def get(name):
        if name not in cache:
            model = model_zoo(name)
            d = tmp_path_factory.mktemp(name)
            ours, stock = d / "ours.keras", d / "stock.keras"
            ksf.save_model(model, ours)
            keras.saving.save_model(model, stock)
            cache[name] = (model, ours, stock)
        return cache[name]

    return get


def _custom_objects(name):
    return CUSTOM_OBJECTS if name == "custom_layers" else None


@pytest.mark.parametrize("name", sorted(MODELS))
def test_weights_member_is_stocks_byte_for_byte(saved, name):
    _, ours, stock = saved(name)
    assert member(ours, WEIGHTS) == member(stock, WEIGHTS)
    assert member(ours, "config.json") == member(stock, "config.json")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zip_layout_matches_stock(saved, name):
    _, ours, stock = saved(name)
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(stock) as b:
        assert a.testzip() is None
        fields = (
            "filename",
            "compress_type",
            "file_size",
            "compress_size",
            "external_attr",
            "create_system",
        )
        for x, y in zip(a.infolist(), b.infolist(), strict=True):
            assert [getattr(x, f) for f in fields] == [getattr(y, f) for f in fields]
            assert x.header_offset == y.header_offset
            assert x.flag_bits == y.flag_bits and x.extract_version == y.extract_version
    assert h5_tree(member(ours, WEIGHTS)) == h5_tree(member(stock, WEIGHTS))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("direction", ["ours_to_stock", "stock_to_ours", "ours_to_ours"])
def test_state_round_trips_bitwise(saved, name, direction):
    model, ours, stock = saved(name)
    kwargs = {"custom_objects": _custom_objects(name)}
    if direction == "ours_to_stock":
        loaded = keras.saving.load_model(ours, **kwargs)
    elif direction == "stock_to_ours":
        loaded = ksf.load_model(stock, **kwargs)
    else:
        loaded = ksf.load_model(ours, **kwargs)
    assert_same_state(model, loaded)
    x, _ = _batch(model, seed=7)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))


@pytest.mark.parametrize("name", ["seed_example", "low_precision", "optimizer_adamw", "optimizer_sgd_momentum"])
def test_loaded_model_keeps_training_like_stocks(saved, name):
    """One more training step on our load equals the same step on stock's load, bitwise."""
    model, ours, stock = saved(name)
    ours_loaded = ksf.load_model(ours)
    stock_loaded = keras.saving.load_model(stock)
    x, y = _batch(model, seed=3)
    ours_loaded.train_on_batch(x, y)
    stock_loaded.train_on_batch(x, y)
    assert_same_state(stock_loaded, ours_loaded)
    assert int(ours_loaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) + 1


def test_seed_example_predictions(saved):
    """The docstring example of stock `save_model`, through our save and load."""
    model, ours, _ = saved("seed_example")
    loaded = ksf.load_model(ours)
    x = keras.random.uniform((10, 3))
    assert np.allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0))


def test_unregistered_custom_layer_needs_custom_objects(saved):
    _, ours, stock = saved("custom_layers")
    with pytest.raises(TypeError) as stock_error:
        keras.saving.load_model(stock)
    with pytest.raises(type(stock_error.value)):
        ksf.load_model(ours)


def test_include_optimizer_false_omits_optimizer_state(model_zoo, tmp_path):
    model = model_zoo("optimizer_adam")
    path = tmp_path / "no_opt.keras"
    ksf.save_model(model, path, include_optimizer=False)
    assert "optimizer/vars" not in h5_tree(member(path, WEIGHTS))
    for load in (ksf.load_model, keras.saving.load_model):
        with pytest.warns(UserWarning, match="Skipping variable loading for optimizer"):
            loaded = load(path)
        for a, b in zip(model.weights, loaded.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert int(loaded.optimizer.iterations.numpy()) == 0
        loaded.train_on_batch(*_batch(model))  # a fresh optimizer that still trains


def test_compile_false_leaves_model_uncompiled(saved):
    model, ours, _ = saved("seed_example")
    loaded = ksf.load_model(ours, compile=False)
    assert not loaded.compiled
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_lambda_refused_in_safe_mode(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda t: t * 2)])
    path = tmp_path / "lambda.keras"
    ksf.save_model(model, path)
    with pytest.raises(ValueError, match=r"unsafe|lambda|Lambda"):
        ksf.load_model(path)
    loaded = ksf.load_model(path, safe_mode=False)
    np.testing.assert_array_equal(loaded.predict(np.ones((1, 2)), verbose=0), [[2.0, 2.0]])


def test_assets_round_trip(tmp_path):
    """A layer with assets (an adapted vocabulary) saves `assets/...` members as stock does."""
    lookup = keras.layers.StringLookup()
    lookup.adapt(np.array(["alpha", "beta", "gamma", "beta"]))
    inputs = keras.Input((1,), dtype="string")
    model = keras.Model(inputs, keras.layers.Embedding(8, 2)(lookup(inputs)))
    ours, stock = tmp_path / "ours.keras", tmp_path / "stock.keras"
    ksf.save_model(model, ours)
    keras.saving.save_model(model, stock)
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(stock) as b:
        assert [(i.filename, i.file_size) for i in a.infolist()] == [(i.filename, i.file_size) for i in b.infolist()]
        assert any(name.startswith("assets/") for name in a.namelist())
        assets = [n for n in a.namelist() if n.startswith("assets/")]
        assert [a.read(n) for n in assets] == [b.read(n) for n in assets]
    words = tf.constant([["gamma"], ["alpha"], ["unknown"]])
    expected = model.predict(words, verbose=0)
    for path, load in ((ours, keras.saving.load_model), (stock, ksf.load_model), (ours, ksf.load_model)):
        loaded = load(path)
        np.testing.assert_array_equal(loaded.predict(words, verbose=0), expected)
        assert loaded.layers[1].get_vocabulary() == lookup.get_vocabulary()


def test_repeated_saves_reuse_the_layout_and_stay_stocks(tmp_path, monkeypatch):
    """The second save of an architecture skips h5py (its layout is reused) and is still stock's file."""
    from conftest import low_precision
    from kerassave_fast.formats import weights_h5

    model = low_precision()
    weights_h5._LAYOUTS.clear()
    ksf.save_model(model, tmp_path / "first.keras")
    assert len(weights_h5._LAYOUTS) == 1

    def no_h5py(*args, **kwargs):
        raise AssertionError("the layout should have been reused")

    monkeypatch.setattr(weights_h5, "write_skeleton", no_h5py)
    for step in range(2):
        model.train_on_batch(*_batch(model, seed=step))  # new values, same layout
        ksf.save_model(model, tmp_path / "ours.keras")
        keras.saving.save_model(model, tmp_path / "stock.keras")
        assert member(tmp_path / "ours.keras", WEIGHTS) == member(tmp_path / "stock.keras", WEIGHTS)
        assert_same_state(model, keras.saving.load_model(tmp_path / "ours.keras"))
    renamed = low_precision()  # same shapes, other layer names: another layout
    monkeypatch.undo()
    ksf.save_model(renamed, tmp_path / "renamed.keras")
    assert len(weights_h5._LAYOUTS) == 2
    assert_same_state(renamed, ksf.load_model(tmp_path / "renamed.keras"))


def test_a_replayed_walk_whose_layout_was_forgotten_writes_each_snapshot_as_it_is_taken(tmp_path, monkeypatch):
    """A model saved before whose layout is no longer remembered (the cache let it go): the layout is
    made from the shapes and dtypes its remembered walk recorded, before any snapshot is taken, so
    each snapshot is written as it is taken, as when the layout is remembered; still stock's file."""
    from conftest import low_precision
    from kerassave_fast.formats import keras_zip, weights_h5
    from kerassave_fast.keras3 import state

    model = low_precision()
    ours, stock = tmp_path / "ours.keras", tmp_path / "stock.keras"
    ksf.save_model(model, ours)
    events = []
    taken = state.snapshots

    def recorded_snapshots(values):
        for array in taken(values):
            events.append("snapshot")
            yield array

    class RecordedStreamedWrite(keras_zip.StreamedWrite):
        def place(self, offset, array):
            events.append("write")
            super().place(offset, array)

    monkeypatch.setattr(state, "snapshots", recorded_snapshots)
    monkeypatch.setattr(keras_zip, "StreamedWrite", RecordedStreamedWrite)
    for step in range(2):
        model.train_on_batch(*_batch(model, seed=step))
        weights_h5._LAYOUTS.clear()
        events.clear()
        ksf.save_model(model, ours)
        keras.saving.save_model(model, stock)
        assert events.count("snapshot") == events.count("write") == len(model.weights) + len(model.optimizer.variables)
        assert events[:3] == ["snapshot", "write", "snapshot"]  # the first written before the second is taken
        assert len(weights_h5._LAYOUTS) == 1
        assert member(ours, WEIGHTS) == member(stock, WEIGHTS)
        assert_same_state(model, ksf.load_model(ours))


class _Float8Scale(keras.layers.Layer):
    """A float8 weight: a dtype HDF5 stores as opaque bytes, which h5py writes itself."""

    def build(self, input_shape):
        self.scale = self.add_weight(
            shape=(4,),
            dtype="float8_e4m3fn",
            initializer=lambda shape, dtype: keras.ops.cast(keras.ops.full(shape, 1.5, "float32"), dtype),
            trainable=False,
        )

    def call(self, x):
        return x


def test_a_replayed_walk_with_a_dataset_h5py_writes_itself_saves_its_values(tmp_path):
    """Review: a float8 variable's bytes are written by h5py, into the metadata, so its layout is
    never remembered and never made from the walk's stand-ins: every save writes its values, as stock."""
    model = keras.Sequential([keras.Input((4,)), _Float8Scale(), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    keras.saving.save_model(model, tmp_path / "stock.keras")
    for _ in range(2):  # the second save replays the walk
        ksf.save_model(model, tmp_path / "ours.keras")
        assert member(tmp_path / "ours.keras", WEIGHTS) == member(tmp_path / "stock.keras", WEIGHTS)


def test_registered_custom_layer_loads_with_or_without_custom_objects(tmp_path):
    from conftest import Scale

    model = keras.Sequential([keras.Input((4,)), Scale(), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    model.train_on_batch(*_batch(model))
    path = tmp_path / "registered.keras"
    ksf.save_model(model, path)
    for custom_objects in (None, {"ksf_tests>Scale": Scale}, {"Scale": Scale}):
        for load in (ksf.load_model, keras.saving.load_model):
            assert_same_state(model, load(path, custom_objects=custom_objects))


@pytest.mark.parametrize("optimizer", ["nadam", "adafactor", "schedule_free_adamw", "lamb"])
def test_optimizers_that_build_differently_load_like_stock(tmp_path, optimizer):
    """Some stock optimizers create or assign valued variables while building: built the stock way."""
    optimizers = {
        "nadam": keras.optimizers.Nadam,
        "adafactor": keras.optimizers.Adafactor,
        "schedule_free_adamw": getattr(keras.optimizers, "ScheduleFreeAdamW", keras.optimizers.Nadam),
        "lamb": keras.optimizers.Lamb,
    }
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
    model.compile(optimizer=optimizers[optimizer](), loss="mse")
    for step in range(2):
        model.train_on_batch(*_batch(model, seed=step))
    path = tmp_path / "m.keras"
    ksf.save_model(model, path)
    ours, stock = ksf.load_model(path), keras.saving.load_model(path)
    assert_same_state(model, ours)
    x, y = _batch(model, seed=9)
    ours.train_on_batch(x, y)
    stock.train_on_batch(x, y)
    assert_same_state(stock, ours)


@pytest.mark.parametrize("layout_remembered", [True, False], ids=["remembered-layout", "layout-made-again"])
def test_an_early_write_never_lands_on_a_config_that_grew_past_it(tmp_path, monkeypatch, layout_remembered):
    """Freezing layers for fine-tuning lengthens the config by more than the weights member's local
    header: the tensors' early write, at the last start, then covers the end of the new config. It
    must be over before the config is written, however late it runs (here: held back on purpose),
    whether it writes a remembered layout or the tensors h5py places while it lays the file out."""
    from kerassave_fast.formats import keras_zip, weights_h5

    model = keras.Sequential([keras.Input((3,))] + [keras.layers.Dense(2) for _ in range(64)])
    model.compile(optimizer="adam", loss="mse")
    model.train_on_batch(*_batch(model))

    class LateStreamedWrite(weights_h5.StreamedWrite):
        def _write(self):
            time.sleep(0.5)
            super()._write()

    monkeypatch.setattr(keras_zip, "StreamedWrite", LateStreamedWrite)
    ours, stock = tmp_path / "ours.keras", tmp_path / "stock.keras"
    ksf.save_model(model, ours)
    before = len(member(ours, "config.json"))
    for layer in model.layers:
        layer.trainable = False
        for regularized in ("kernel", "bias", "activity"):  # the config grows past the first tensor too
            setattr(layer, f"{regularized}_regularizer", keras.regularizers.L2(0.5))
    if not layout_remembered:
        weights_h5._LAYOUTS.clear()
    ksf.save_model(model, ours)
    keras.saving.save_model(model, stock)
    offsets = []
    with h5py.File(io.BytesIO(member(ours, WEIGHTS))) as h5:
        h5.visititems(lambda _, obj: offsets.append(obj.id.get_offset()) if isinstance(obj, h5py.Dataset) else None)
    first_tensor = min(o for o in offsets if o is not None)
    assert len(member(ours, "config.json")) - before > 30 + len(WEIGHTS) + first_tensor  # past the old start
    with zipfile.ZipFile(ours) as z:
        assert z.testzip() is None
    for name in (WEIGHTS, "config.json"):
        assert member(ours, name) == member(stock, name)
    loaded = ksf.load_model(ours)  # its optimizer is built for no trainable variable, as stock's
    for expected, found in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(expected.numpy(), found.numpy())


def test_a_repeated_save_writes_tensors_early_and_stays_stocks_when_the_config_changes(tmp_path, monkeypatch):
    """A blocking repeated save writes the tensors where the weights member started last time while
    the config is serialized; a config of another length moves the member, and the tensors are
    written again where it starts: the file is still stock's (members, offsets, no stray bytes)."""
    from conftest import low_precision
    from kerassave_fast.formats import keras_zip

    model = low_precision()
    early = []  # where each early write of a save started

    class RecordedStreamedWrite(keras_zip.StreamedWrite):
        def __init__(self, file, start, threads=0):
            early.append(start)
            super().__init__(file, start, threads)

    monkeypatch.setattr(keras_zip, "StreamedWrite", RecordedStreamedWrite)
    ours, stock = tmp_path / "ours.keras", tmp_path / "stock.keras"
    config_lengths = []
    for step, rate in enumerate([0.5, 0.001, 0.25]):  # the config longer ("0.0010000000474974513"), then shorter
        model.optimizer.learning_rate.assign(rate)
        model.train_on_batch(*_batch(model, seed=step))
        last = keras_zip._STARTS.get(model)
        early.clear()
        ksf.save_model(model, ours)
        keras.saving.save_model(model, stock)
        if step:  # every save after the first began early, at the last start
            assert early[:1] == [last[1]]
        with zipfile.ZipFile(ours) as a, zipfile.ZipFile(stock) as b:
            assert a.testzip() is None
            assert [(i.filename, i.header_offset, i.file_size) for i in a.infolist()] == [
                (i.filename, i.header_offset, i.file_size) for i in b.infolist()
            ]
        assert ours.stat().st_size == stock.stat().st_size
        for name in (WEIGHTS, "config.json"):
            assert member(ours, name) == member(stock, name)
        assert_same_state(model, ksf.load_model(ours))
        config_lengths.append(len(member(ours, "config.json")))
    assert config_lengths[0] < config_lengths[1] > config_lengths[2]  # each early write went to the wrong place
    key, start, lengths = keras_zip._STARTS[model]
    keras_zip._STARTS[model] = (key, start + (1 << 16), lengths)  # an early write far past where the file ends
    ksf.save_model(model, ours)
    keras.saving.save_model(model, stock)
    assert ours.stat().st_size == stock.stat().st_size and member(ours, WEIGHTS) == member(stock, WEIGHTS)
    with zipfile.ZipFile(ours) as a:
        assert a.testzip() is None


@keras.saving.register_keras_serializable(package="kerassave_fast_tests")
class Temperature(keras.layers.Layer):
    """A layer whose one weight is a scalar (shape ()) of the layer's dtype."""

    def build(self, input_shape):
        self.temperature = self.add_weight(shape=(), initializer="ones", name="temperature")

    def call(self, x):
        return x * keras.ops.cast(self.temperature, x.dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_scalar_variables_of_every_float_dtype_save_as_stock(tmp_path, dtype):
    """A 0-d tensor reads back as a numpy scalar, which TensorFlow could not turn into a bfloat16
    array: every save of a model with a bfloat16 scalar failed where stock's succeed."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), Temperature(dtype=dtype)])
    model.layers[-1].temperature.assign(2.5)
    ksf.save_model(model, tmp_path / "ours.keras")
    keras.saving.save_model(model, tmp_path / "stock.keras")
    assert member(tmp_path / "ours.keras", "model.weights.h5") == member(tmp_path / "stock.keras", "model.weights.h5")
    ksf.save_weights(model, tmp_path / "ours.weights.h5")
    model.save_weights(tmp_path / "stock.weights.h5")
    assert (tmp_path / "ours.weights.h5").read_bytes() == (tmp_path / "stock.weights.h5").read_bytes()
    ksf.save_model(model, tmp_path / "ours.h5")
    ksf.save_model(model, tmp_path / "zstd.keras", compression="zstd")
    for path in ("ours.keras", "stock.keras", "ours.h5", "zstd.keras"):
        assert_same_state(model, ksf.load_model(tmp_path / path))
