"""Legacy HDF5 `.h5` files of both flavours: `save_model(model, "m.h5")`, `load_model("m.h5")` and
tf_keras' `save_weights(model, "w.h5")`. Stock is the oracle: our files are stock's byte for
byte, and a load restores what the original model held, optimizer state included."""

from __future__ import annotations

import os

import h5py
import keras
import numpy as np
import pytest

import kerassave_fast as ksf
from conftest import CUSTOM_OBJECTS, MODELS, _batch, assert_same_state
from kerassave_fast import KerasSaveError
from kerassave_fast.formats import weights_h5

tf_keras = pytest.importorskip("tf_keras")
import tf_keras_models  # noqa: E402


@pytest.fixture(scope="module")
def saved(model_zoo, tmp_path_factory):
    """(model, our .h5, stock's .h5) for a zoo model, each saved once."""
    cache = {}

    def get(name):
        if name not in cache:
            model = model_zoo(name)
            base = tmp_path_factory.mktemp(f"h5_{name}")
            ours, stock = str(base / "ours.h5"), str(base / "stock.h5")
            stock_save(model, stock)
            ksf.save_model(model, ours)
            cache[name] = model, ours, stock
        return cache[name]

    return get


def stock_save(model, path, **kwargs) -> None:
    """Stock's `.h5` save, undoing its side effect on the model: it drops "optimizer" from the
    compile config, and these models are shared with other tests (which save them as `.keras`)."""
    compile_config = getattr(model, "_compile_config", None)
    kept = dict(compile_config.config) if compile_config is not None else None
    keras.saving.save_model(model, path, **kwargs)
    if kept is not None:
        compile_config.config.update(kept)


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_keras3_h5_is_stocks_byte_for_byte(saved, name):
    _, ours, stock = saved(name)
    assert _read(ours) == _read(stock)


def test_keras3_h5_of_layers_with_non_ascii_names_is_stocks_byte_for_byte(tmp_path):
    """h5py makes a weight's parent groups from its encoded name, with ASCII-coded links: a
    UTF-8-coded one would make HDF5 turn the group new-style (our file differed here). tf_keras
    refuses such names (TensorFlow's scope names)."""
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="dénse_ü"), keras.layers.Dense(1, name="出力")]
    )
    model.compile(optimizer="adam", loss=keras.losses.MeanSquaredError())
    model.optimizer.build(model.trainable_variables)
    stock_save(model, tmp_path / "stock.h5")
    ksf.save_model(model, tmp_path / "ours.h5")
    assert _read(tmp_path / "ours.h5") == _read(tmp_path / "stock.h5")
    assert_same_state(model, ksf.load_model(tmp_path / "ours.h5"))


@pytest.mark.parametrize("include_optimizer", [True, False])
def test_keras3_h5_without_optimizer_or_uncompiled_is_stocks(tmp_path, model_zoo, include_optimizer):
    uncompiled = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    for i, model in enumerate([model_zoo("optimizer_adam"), uncompiled]):
        stock_save(model, tmp_path / f"stock{i}.h5", include_optimizer=include_optimizer)
        ksf.save_model(model, tmp_path / f"ours{i}.h5", include_optimizer=include_optimizer)
        assert _read(tmp_path / f"ours{i}.h5") == _read(tmp_path / f"stock{i}.h5")


def test_keras3_h5_save_leaves_the_models_compile_config_alone(tmp_path, model_zoo):
    """Stock's metadata step pops "optimizer" out of the compile config; a second save must still record it."""
    model = model_zoo("optimizer_sgd_momentum")
    ksf.save_model(model, tmp_path / "a.h5")
    ksf.save_model(model, tmp_path / "b.h5")
    with h5py.File(tmp_path / "b.h5") as f:
        assert b"optimizer_config" in f.attrs["training_config"].encode()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("which", ["ours", "stock"])
def test_keras3_h5_load_restores_weights_and_optimizer_state(saved, name, which):
    """Stock Keras 3.15 cannot load these files back (their loss is "mse"), and loses the optimizer
    state of those it loads; ours restores both, bitwise, from its files and from stock's."""
    model, ours, stock = saved(name)
    loaded = ksf.load_model(ours if which == "ours" else stock, custom_objects=CUSTOM_OBJECTS)
    assert_same_state(model, loaded)


@pytest.mark.parametrize("name", ["seed_example", "low_precision", "optimizer_adamw", "optimizer_rmsprop", "convnet"])
def test_keras3_h5_next_training_step_is_the_originals(saved, name, tmp_path):
    """One more step after our `.h5` load equals one more step after stock's `.keras` load, bitwise."""
    model, ours, _ = saved(name)
    keras.saving.save_model(model, tmp_path / "m.keras")
    reference = keras.saving.load_model(tmp_path / "m.keras")
    loaded = ksf.load_model(ours)
    x, y = _batch(model, seed=5)
    reference.train_on_batch(x, y)
    loaded.train_on_batch(x, y)
    assert_same_state(reference, loaded)
    assert int(loaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) + 1


def test_keras3_h5_load_of_a_loss_scale_optimizer_with_a_loss_by_name(tmp_path):
    """The loss-by-name retry must start from the whole config: the first attempt deserializes the
    LossScaleOptimizer, which takes "inner_optimizer" out of it (a KeyError, found by a reviewing subagent)."""
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile("adam", "mse")
        model.train_on_batch(np.ones((4, 4), "float32"), np.ones((4, 2), "float32"))
        ksf.save_model(model, tmp_path / "m.h5")
        loaded = ksf.load_model(tmp_path / "m.h5")
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert isinstance(loaded.optimizer, keras.optimizers.LossScaleOptimizer)
    assert_same_state(model, loaded)


def test_stock_keras3_reads_our_h5(saved):
    """Stock's own reader, on a file of ours: the weights it gets are the original's."""
    model, ours, _ = saved("custom_layers")
    loaded = keras.saving.load_model(ours, custom_objects=CUSTOM_OBJECTS, compile=False)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_keras3_h5_loss_objects_and_compile_false(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss=keras.losses.MeanSquaredError(), metrics=["mae"])
    model.train_on_batch(np.ones((2, 3), "float32"), np.ones((2, 2), "float32"))
    ksf.save_model(model, tmp_path / "m.h5")
    assert isinstance(ksf.load_model(tmp_path / "m.h5").loss, keras.losses.MeanSquaredError)
    assert not ksf.load_model(tmp_path / "m.h5", compile=False).compiled
    stock = keras.saving.load_model(tmp_path / "m.h5")  # stock loads this one (a loss object)
    for a, b in zip(stock.weights, ksf.load_model(tmp_path / "m.h5").weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_keras3_h5_save_makes_the_directory_and_a_failed_save_keeps_the_old_file(tmp_path, model_zoo):
    path = tmp_path / "new" / "dir" / "m.h5"
    ksf.save_model(model_zoo("seed_example"), path)
    before = _read(path)
    bad = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="x" * 70000)])
    with pytest.raises(RuntimeError, match="larger than"):  # stock's own refusal, raised before any write
        ksf.save_model(bad, path)
    assert _read(path) == before
    assert sorted(os.listdir(path.parent)) == ["m.h5"]


def test_keras3_h5_truncated_file_is_refused_naming_it(saved, tmp_path):
    _, ours, _ = saved("optimizer_adam")
    data = _read(ours)
    for cut in (len(data) - 100, len(data) // 2, 600):
        path = tmp_path / f"cut{cut}.h5"
        path.write_bytes(data[:cut])
        with pytest.raises((KerasSaveError, OSError, ValueError, KeyError)) as raised:
            ksf.load_model(path)
        named = [str(raised.value), *getattr(raised.value, "__notes__", [])]
        assert any(str(path) in text for text in named)


def test_keras3_h5_chunked_gzip_tensors_from_another_writer_load(tmp_path, saved):
    """Datasets stored chunked and compressed by h5py's own choice of chunks (as other writers may)
    are read by the Rust core's chunk reader, bitwise."""
    model, ours, _ = saved("seed_example")
    path = tmp_path / "chunked.h5"
    with h5py.File(ours) as src, h5py.File(path, "w") as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v

        def copy_item(name, obj):
            if isinstance(obj, h5py.Group):
                group = dst.require_group(name)
                for k, v in obj.attrs.items():
                    group.attrs[k] = v
            elif obj.ndim:
                dst.create_dataset(name, data=obj[()], chunks=True, compression="gzip")
            else:
                dst.create_dataset(name, data=obj[()])

        src.visititems(copy_item)
    assert_same_state(model, ksf.load_model(path))


# --- tf_keras -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=tf_keras_models.MODELS, ids=lambda f: f.__name__)
def tf_keras_saved(request, tmp_path_factory):
    model = tf_keras_models.trained(request.param)
    base = tmp_path_factory.mktemp(f"tfk_h5_{request.param.__name__}")
    paths = {k: str(base / f"{k}.h5") for k in ("stock", "ours", "stock_w", "ours_w")}
    model.save(paths["stock"])
    ksf.save_model(model, paths["ours"])
    model.save_weights(paths["stock_w"])
    ksf.save_weights(model, paths["ours_w"])
    return model, paths


def test_tf_keras_h5_is_stocks_byte_for_byte(tf_keras_saved):
    _, paths = tf_keras_saved
    assert _read(paths["ours"]) == _read(paths["stock"])
    assert _read(paths["ours_w"]) == _read(paths["stock_w"])


def test_tf_keras_h5_without_optimizer_is_stocks(tmp_path):
    model = tf_keras_models.trained(tf_keras_models.dense_adam)
    model.save(tmp_path / "stock.h5", include_optimizer=False)
    ksf.save_model(model, tmp_path / "ours.h5", include_optimizer=False)
    assert _read(tmp_path / "ours.h5") == _read(tmp_path / "stock.h5")


@pytest.mark.parametrize("which", ["ours", "stock"])
def test_tf_keras_h5_loads_as_stock_loads_it(tf_keras_saved, which):
    model, paths = tf_keras_saved
    try:
        reference = tf_keras.models.load_model(paths["stock"])
    except ValueError as e:  # bfloat16 weights: stock cannot read back what it wrote; we load them
        assert "No cast function available" in str(e)
        loaded = ksf.load_model_as("tf_keras", paths[which])
        # (Its optimizer, a LossScaleOptimizer, comes back fresh with stock's warning: stock's
        # `set_weights` path refuses it, whatever the dtypes.)
        for a, b in zip(model.weights, loaded.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        return
    loaded = ksf.load_model_as("tf_keras", paths[which])
    tf_keras_models.assert_same_state(reference, loaded)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_tf_keras_h5_load_is_ours_and_trains_on_as_stocks(tf_keras_saved, monkeypatch):
    """The load does not go through stock's reader, and the next training step after it equals
    the one after stock's load, bitwise (weights and optimizer state)."""
    from tf_keras.src.saving.legacy import hdf5_format

    model, paths = tf_keras_saved
    try:
        reference = tf_keras.models.load_model(paths["stock"])
    except ValueError:
        return  # bfloat16 weights: stock cannot read back what it wrote (test above)

    def not_stock(*args, **kwargs):
        raise AssertionError("stock's reader ran")

    monkeypatch.setattr(hdf5_format, "load_model_from_hdf5", not_stock)
    loaded = ksf.load_model_as("tf_keras", paths["ours"])
    batch = tf_keras_models.batch(model, seed=7)
    for m in (reference, loaded):
        m.train_on_batch(*batch)
    for a, b in zip(*(tf_keras_models.state(m) for m in (reference, loaded)), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_tf_keras_h5_load_in_a_graph_is_stocks(tf_keras_saved):
    """Inside a TF1-style graph (stock's `test_mode_graph` cases) the load goes to stock, whose
    variables take their values through placeholders: an adopted eager tensor cannot be captured."""
    import tensorflow as tf

    model, paths = tf_keras_saved
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        try:
            loaded = ksf.load_model_as("tf_keras", paths["ours"])
        except ValueError:  # bfloat16 weights: stock cannot read back what it wrote
            return
        values = session.run(loaded.weights)
    for a, b in zip(model.weights, values, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)


def test_tf_keras_h5_weights_load_into_a_fresh_model(tf_keras_saved):
    """Stock's `load_weights` on our weights file does what it does on its own: loads the
    original's weights, or (bfloat16 weights) fails the same way."""
    model, paths = tf_keras_saved
    outcomes = []
    for which in ("stock_w", "ours_w"):
        fresh = tf_keras.models.clone_model(model)
        try:
            fresh.load_weights(paths[which])
            outcomes.append([w.numpy().tobytes() for w in fresh.weights])
        except ValueError as e:
            outcomes.append(str(e))
    assert outcomes[0] == outcomes[1]
    if not isinstance(outcomes[0], str):
        assert outcomes[0] == [w.numpy().tobytes() for w in model.weights]


def test_tf_keras_subclassed_model_h5_is_stocks_refusal(tmp_path):
    class Sub(tf_keras.Model):
        def __init__(self):
            super().__init__()
            self.d = tf_keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    model = Sub()
    model(np.ones((1, 3), "float32"))
    with pytest.raises(NotImplementedError):
        ksf.save_model(model, tmp_path / "m.h5")


def test_layouts_are_cached_per_architecture(tmp_path, model_zoo, monkeypatch):
    model = model_zoo("optimizer_rmsprop")
    ksf.save_model(model, tmp_path / "a.h5")
    calls = []
    real = weights_h5.write_skeleton
    monkeypatch.setattr(weights_h5, "write_skeleton", lambda *a: calls.append(1) or real(*a))
    ksf.save_model(model, tmp_path / "b.h5")
    assert not calls
    assert _read(tmp_path / "a.h5") == _read(tmp_path / "b.h5")


@pytest.mark.parametrize("name", ["convnet", "custom_layers", "low_precision"])
def test_keras3_load_weights_of_an_h5_is_stocks(saved, name):
    """`load_weights` of a legacy `.h5` (ours and stock's) into a fresh model: the original's weights."""
    model, ours, stock = saved(name)
    for path in (ours, stock):
        fresh = keras.models.clone_model(model)
        ksf.load_weights(fresh, path)
        for a, b in zip(model.weights, fresh.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    if name == "low_precision":
        return  # stock's reader (below) cannot read the bfloat16 weights it wrote
    fresh = keras.models.clone_model(model)
    ksf.load_weights(fresh, ours, by_name=True)  # stock's keyword: stock's path
    for a, b in zip(model.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_keras3_load_weights_of_an_h5_skip_mismatch(tmp_path):
    small = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)])
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(4)])
    ksf.save_model(small, tmp_path / "m.h5")
    with pytest.raises(ValueError, match="Shape mismatch"):
        ksf.load_weights(other, tmp_path / "m.h5")
    with pytest.warns(UserWarning, match="Skipping loading weights"):
        ksf.load_weights(other, tmp_path / "m.h5", skip_mismatch=True)
    np.testing.assert_array_equal(small.layers[0].kernel.numpy(), other.layers[0].kernel.numpy())


@pytest.mark.parametrize("which", ["stock_w", "ours_w", "stock", "ours"])
def test_tf_keras_load_weights_of_an_h5_is_ours_and_stocks(tf_keras_saved, which, monkeypatch):
    """`load_weights` of a weights file or of a whole model's `.h5` (its `model_weights`): what
    stock's `load_weights` loads, bitwise, or its error; stock's reader does not run."""
    from tf_keras.src.saving.legacy import hdf5_format

    model, paths = tf_keras_saved
    reference = tf_keras.models.clone_model(model)
    try:
        reference.load_weights(paths[which])
        expected = [w.numpy().tobytes() for w in reference.weights]
    except ValueError as e:
        expected = str(e)
    monkeypatch.setattr(hdf5_format, "load_weights_from_hdf5_group", lambda *a, **k: pytest.fail("stock ran"))
    fresh = tf_keras.models.clone_model(model)
    try:
        ksf.load_weights(fresh, paths[which])
        got = [w.numpy().tobytes() for w in fresh.weights]
    except ValueError as e:
        got = str(e)
    if isinstance(expected, str):  # bfloat16 weights: stock cannot read back what it wrote; we can
        assert got == [w.numpy().tobytes() for w in model.weights]
    else:
        assert got == expected


def test_tf_keras_load_weights_of_an_h5_refuses_as_stock(tf_keras_saved):
    _, paths = tf_keras_saved
    other = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(2)])
    with pytest.raises(ValueError) as stock_error:
        other.load_weights(paths["stock_w"])
    with pytest.raises(ValueError) as our_error:
        ksf.load_weights(other, paths["ours_w"])
    assert str(our_error.value) == str(stock_error.value)
    with pytest.raises(ValueError, match="skip_mismatch can only be set to True when by_name is True"):
        ksf.load_weights(other, paths["ours_w"], skip_mismatch=True)  # stock's refusal, through stock


@keras.saving.register_keras_serializable(package="kerassave_fast_tests")
class AssignsWhileBuilding(keras.layers.Layer):
    """A layer that gives its variable a value in `build`: our deferred build gives up on it."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="w")
        self.w.assign(np.ones(input_shape[-1], "float32"))

    def call(self, x):
        return x * self.w


def test_a_functional_h5_whose_deferred_build_gives_up_loads_as_in_stock(tmp_path):
    """The build retried the stock way once reused the config the first attempt had consumed
    (a Functional's came back empty: "Unable to revive model from config")."""
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(AssignsWhileBuilding()(inputs)))
    model.layers[1].w.assign(np.array([1.5, -2.0, 3.0], "float32"))
    stock_save(model, tmp_path / "stock.h5")
    ksf.save_model(model, tmp_path / "ours.h5")
    for path in ("stock.h5", "ours.h5"):
        ours, stock = ksf.load_model(tmp_path / path), keras.saving.load_model(tmp_path / path)
        assert [v.path for v in ours.weights] == [v.path for v in stock.weights]
        for a, b, c in zip(model.weights, ours.weights, stock.weights, strict=True):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes() == np.asarray(c).tobytes()


# --- first saves without h5py -------------------------------------------------------------------


def _laid_out_by_h5py(save, path, monkeypatch) -> bool:
    """Whether a first save `save(path)` ran h5py's layout code (else the Rust core replayed it)."""
    calls = []
    write_skeleton = weights_h5.write_skeleton

    def spy(*args, **kwargs):
        calls.append(args)
        return write_skeleton(*args, **kwargs)

    weights_h5._LAYOUTS.clear()
    with monkeypatch.context() as patched:
        patched.setattr(weights_h5, "write_skeleton", spy)
        save(path)
    return bool(calls)


# bfloat16 tensors of a legacy file are made by `create_dataset` as h5py types them (no Keras 3
# `dtype` attribute): h5py lays those files out; every other model is replayed.
_H5PY_LAYS_OUT = {"low_precision"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_keras3_h5_first_save_runs_no_h5py_and_is_stocks(saved, name, tmp_path, monkeypatch):
    """The root attributes (`model_config` ...), `layer_names` and `weight_names` (arrays of
    variable-length strings), headers grown into continuation chunks: replayed, not laid out by h5py."""
    model, _, stock = saved(name)
    by_h5py = _laid_out_by_h5py(lambda p: ksf.save_model(model, p), str(tmp_path / "ours.h5"), monkeypatch)
    assert by_h5py == (name in _H5PY_LAYS_OUT)
    assert _read(tmp_path / "ours.h5") == _read(stock)


def test_tf_keras_h5_first_save_runs_no_h5py_and_is_stocks(tf_keras_saved, tmp_path, monkeypatch):
    model, paths = tf_keras_saved
    expected = any(w.dtype == "bfloat16" for w in model.weights)  # as `_H5PY_LAYS_OUT`
    for save, ours, stock in [(ksf.save_model, "ours.h5", "stock"), (ksf.save_weights, "ours_w.h5", "stock_w")]:
        assert _laid_out_by_h5py(lambda p, save=save: save(model, p), str(tmp_path / ours), monkeypatch) == expected
        assert _read(tmp_path / ours) == _read(paths[stock])


@pytest.mark.parametrize("layers", [500, 1000])
def test_keras3_h5_of_many_layers_first_save_runs_no_h5py_and_is_stocks(tmp_path, monkeypatch, layers):
    """500 layers: a `model_config` of ~0.6 MB, past the replay's bound on metadata touched since
    a global heap collection was last used, written while libhdf5's metadata cache cannot have
    evicted anything yet. 1,000 layers (the bench's many-array model): more than the 16 collections
    libhdf5 lists with free space, old ones it may have evicted. Replayed, stock's file byte for byte."""
    inputs = keras.Input((8,))
    outputs = keras.layers.Concatenate()([keras.layers.Dense(4)(inputs) for _ in range(layers)])
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss=keras.losses.MeanSquaredError())
    model.optimizer.build(model.trainable_variables)
    stock_save(model, str(tmp_path / "stock.h5"))
    assert not _laid_out_by_h5py(lambda p: ksf.save_model(model, p), str(tmp_path / "ours.h5"), monkeypatch)
    assert _read(tmp_path / "ours.h5") == _read(tmp_path / "stock.h5")


def _objects_moved_past_the_end(path) -> list[bytes]:
    """The file once per symbol-table node, its first entry's object header address moved past the
    end of the file: a file the Rust walk cannot list and libhdf5 cannot visit whole."""
    data = _read(path)
    nodes = [at for at in range(len(data)) if data[at : at + 4] == b"SNOD"]
    assert nodes
    moved = []
    for at in nodes:
        broken = bytearray(data)
        past_the_end = (len(data) + (1 << 20)).to_bytes(8, "little")
        broken[at + 16 : at + 24] = past_the_end  # after the node's 8-byte prefix and entry 0's name offset
        moved.append(bytes(broken))
    return moved


def _error_of(load, path):
    try:
        load(path)
    except Exception as e:  # what each side raises is the point
        return e
    return None


@pytest.mark.parametrize("flavour", ["keras3", "tf_keras"])
def test_a_file_libhdf5_cannot_visit_whole_is_refused_naming_it(tmp_path, flavour):
    """Refused (libhdf5's `RuntimeError`, where stock, reading by path, raises a `KeyError`): its
    datasets could not be checked for overlaps and bounds."""
    if flavour == "tf_keras":
        model = tf_keras_models.trained(tf_keras_models.dense_adam)
        model.save(tmp_path / "stock.h5")
        stock_load, our_load = tf_keras.models.load_model, lambda p: ksf.load_model_as("tf_keras", p)
    else:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
        model.compile(optimizer="adam", loss=keras.losses.MeanSquaredError())  # stock cannot load loss="mse"
        model.train_on_batch(np.ones((2, 3)), np.ones((2, 2)))
        keras.saving.save_model(model, tmp_path / "stock.h5")
        stock_load, our_load = keras.saving.load_model, ksf.load_model
    for i, data in enumerate(_objects_moved_past_the_end(tmp_path / "stock.h5")):
        path = tmp_path / f"broken{i}.h5"
        path.write_bytes(data)
        assert _error_of(stock_load, path) is not None
        our_error = _error_of(our_load, path)
        assert isinstance(our_error, RuntimeError), (i, our_error)
        assert str(path) in str(our_error) + " ".join(getattr(our_error, "__notes__", []))


def test_a_damaged_address_in_a_file_libhdf5_cannot_visit_is_not_loaded(tmp_path):
    """A dataset's address moved onto another's bytes, and a byte that makes libhdf5's visit fail:
    stock, reading by path, loads other bytes as the weights; ours refuses the file."""
    tf_keras.utils.set_random_seed(1)

    def fresh():
        layers = tf_keras.layers
        return tf_keras.Sequential([tf_keras.Input((3,)), layers.Dense(4, name="d1"), layers.Dense(2, name="d2")])

    path, saved = tmp_path / "w.h5", fresh()
    saved.save_weights(path)
    with h5py.File(path, "r") as f:
        first, second = (f[name].id.get_offset().to_bytes(8, "little") for name in ("d1/d1/kernel:0", "d2/d2/kernel:0"))
    data = bytearray(path.read_bytes())
    assert data.count(second) == 1
    at = data.find(second)
    data[at : at + 8] = first  # d2's kernel now reads the first bytes of d1's
    data[142] = 2  # libhdf5's visit of the file now fails; stock's reads by path do not
    path.write_bytes(bytes(data))
    stock = fresh()
    stock.load_weights(path)  # no error: other bytes as d2's kernel
    assert not np.array_equal(stock.get_layer("d2").kernel.numpy(), saved.get_layer("d2").kernel.numpy())
    with pytest.raises(RuntimeError, match=str(path)):
        ksf.load_weights(fresh(), path)
