"""Keras 3 saves replay stock's state walk for a model whose variables have not changed
(keras3/state.py, `_RememberedWalk`). Each test changes something between two saves and checks the
second save against stock's save of the same model, byte for byte."""

from __future__ import annotations

import warnings
import weakref
import zipfile

import h5py
import keras
import numpy as np
import pytest

import kerassave_fast as ksf
from conftest import MODELS, _batch, member, members_but_date
from kerassave_fast.keras3 import state

WEIGHTS = "model.weights.h5"


def assert_saves_like_stock(model, tmp_path, name: str) -> None:
    ksf.save_model(model, tmp_path / f"{name}-ours.keras")
    keras.saving.save_model(model, tmp_path / f"{name}-stock.keras")
    assert members_but_date(tmp_path / f"{name}-ours.keras") == members_but_date(tmp_path / f"{name}-stock.keras")


def test_a_trained_model_replays_its_walk(tmp_path, monkeypatch):
    model = MODELS["low_precision"]()
    assert_saves_like_stock(model, tmp_path, "first")
    remembered = state._WALKS[model]
    # It keeps no old buffer alive: each dataset's array is one element broadcast to its shape.
    assert all(not any(d.array.strides) and d.array.base.nbytes == d.array.itemsize for d in remembered.plan.datasets)

    def no_walk(*args, **kwargs):
        raise AssertionError("stock's walk ran again")

    monkeypatch.setattr(state.saving_lib, "_save_state", no_walk)
    model.train_on_batch(*_batch(model, seed=1))
    ksf.save_model(model, tmp_path / "second-ours.keras")
    monkeypatch.undo()
    keras.saving.save_model(model, tmp_path / "second-stock.keras")
    assert member(tmp_path / "second-ours.keras", WEIGHTS) == member(tmp_path / "second-stock.keras", WEIGHTS)


def test_a_new_optimizer_walks_again(tmp_path):
    model = MODELS["optimizer_adam"]()
    assert_saves_like_stock(model, tmp_path, "adam")
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    model.train_on_batch(*_batch(model))
    assert_saves_like_stock(model, tmp_path, "sgd")


def test_include_optimizer_is_part_of_the_walk(tmp_path):
    model = MODELS["optimizer_adam"]()
    ksf.save_model(model, tmp_path / "fresh-without.keras", include_optimizer=False)
    ksf.save_model(model, tmp_path / "with.keras")
    ksf.save_model(model, tmp_path / "without.keras", include_optimizer=False)
    without = member(tmp_path / "without.keras", WEIGHTS)
    assert without == member(tmp_path / "fresh-without.keras", WEIGHTS)
    assert without != member(tmp_path / "with.keras", WEIGHTS)


@keras.saving.register_keras_serializable(package="kerassave_fast_tests")
class Counter(keras.layers.Layer):
    """Saves a value it computes (not a variable): its walk is never replayed."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def call(self, x):
        return x

    def save_own_variables(self, store):
        store["calls"] = np.array([self.calls], "int64")

    def load_own_variables(self, store):
        self.calls = int(store["calls"][0])


def test_computed_values_are_saved_as_they_are_at_each_save(tmp_path):
    model = keras.Sequential([keras.Input((3,)), Counter(), keras.layers.Dense(2)])
    model.compile("adam", "mse")
    for calls in (1, 2):
        model.layers[0].calls = calls
        assert_saves_like_stock(model, tmp_path, f"calls{calls}")
        assert ksf.load_model(tmp_path / f"calls{calls}-ours.keras").layers[0].calls == calls
    assert model not in state._WALKS


def test_assets_are_saved_as_they_are_at_each_save(tmp_path):
    lookup = keras.layers.StringLookup()
    lookup.adapt(np.array(["alpha", "beta"]))
    inputs = keras.Input((1,), dtype="string")
    model = keras.Model(inputs, keras.layers.Embedding(8, 2)(lookup(inputs)))
    assert_saves_like_stock(model, tmp_path, "two")
    lookup.set_vocabulary(["alpha", "beta", "gamma"])
    assert_saves_like_stock(model, tmp_path, "three")
    assert ksf.load_model(tmp_path / "three-ours.keras").layers[1].get_vocabulary() == lookup.get_vocabulary()


def test_a_weights_only_walk_does_not_stand_in_for_a_model_save(tmp_path):
    """`save_weights` walks without an assets store: it cannot tell that no object saves assets."""
    lookup = keras.layers.StringLookup()
    lookup.adapt(np.array(["alpha", "beta"]))
    inputs = keras.Input((1,), dtype="string")
    model = keras.Model(inputs, keras.layers.Embedding(8, 2)(lookup(inputs)))
    ksf.save_weights(model, tmp_path / "m.weights.h5")
    assert_saves_like_stock(model, tmp_path, "after-weights")
    with zipfile.ZipFile(tmp_path / "after-weights-ours.keras") as zf:
        assert any(name.startswith("assets/") for name in zf.namelist())


@pytest.mark.parametrize("renamed", ["layer", "model", "optimizer"])
def test_a_renamed_object_walks_again(tmp_path, renamed):
    """Each group of the weights file records the name of the object it holds (Keras 3.15): a
    rename between two saves changes those bytes."""
    model = MODELS["optimizer_adam"]()
    assert_saves_like_stock(model, tmp_path, "before")
    assert state._WALKS[model].named  # the names the walk depends on
    target = {"layer": model.layers[-1], "model": model, "optimizer": model.optimizer}[renamed]
    target.name = f"renamed_{renamed}"
    assert_saves_like_stock(model, tmp_path, "after")
    assert member(tmp_path / "after-ours.keras", WEIGHTS) != member(tmp_path / "before-ours.keras", WEIGHTS)


def test_new_variables_walk_again(tmp_path):
    """Quantizing replaces each Dense kernel by int8 values and a scale: new variables."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)])
    assert_saves_like_stock(model, tmp_path, "float")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Layer InputLayer does not have a `quantize` method")
        model.quantize("int8")
    assert_saves_like_stock(model, tmp_path, "int8")
    assert member(tmp_path / "int8-ours.keras", WEIGHTS) != member(tmp_path / "float-ours.keras", WEIGHTS)


@pytest.mark.parametrize("save", ["weights", "model"])
def test_a_remembered_walk_keeps_nothing_alive(tmp_path, save):
    import gc

    model = MODELS["seed_example"]()
    if save == "weights":
        ksf.save_weights(model, tmp_path / "m.weights.h5")
    else:
        ksf.save_model(model, tmp_path / "m.keras")
    assert model in state._WALKS
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the remembered walk does not keep the model (or its variables) alive


@keras.saving.register_keras_serializable(package="test_remembered_walk")
class _PicksWhatItSaves(keras.layers.Layer):
    """Saves one of two variables, chosen by a Python attribute (found by a reviewing subagent)."""

    def __init__(self, use_average=False, **kwargs):
        super().__init__(**kwargs)
        self.use_average = use_average

    def build(self, input_shape):
        self.weight = self.add_weight(shape=(2,), initializer="ones", name="weight")
        self.average = self.add_weight(shape=(2,), initializer="zeros", name="average")

    def call(self, x):
        return x * (self.average if self.use_average else self.weight)

    def get_config(self):
        return {**super().get_config(), "use_average": self.use_average}

    def save_own_variables(self, store):
        store["0"] = self.average if self.use_average else self.weight

    def load_own_variables(self, store):
        (self.average if self.use_average else self.weight).assign(store["0"])


def test_a_layer_choosing_what_it_saves_walks_every_time(tmp_path):
    inputs = keras.Input((2,))
    layer = _PicksWhatItSaves()
    model = keras.Model(inputs, layer(inputs))
    layer.average.assign([5.0, 7.0])
    assert_saves_like_stock(model, tmp_path, "weight")
    assert model not in state._WALKS  # its choice is Python state a replay would not see
    layer.use_average = True
    assert_saves_like_stock(model, tmp_path, "average")
    loaded = ksf.load_model(tmp_path / "average-ours.keras")
    np.testing.assert_array_equal(loaded.layers[1].average.numpy(), [5.0, 7.0])


class _TwoHeads(keras.Model):
    """A subclassed model whose attributes can be reassigned to layers it already tracks."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(3, name="first")
        self.second = keras.layers.Dense(3, name="second")
        self.heads = [keras.layers.Dense(2, name="head_a"), keras.layers.Dense(2, name="head_b")]
        self.head = self.heads[0]

        self.groups = [[keras.layers.Dense(3, name="inner_a")], [keras.layers.Dense(3, name="inner_b")]]
        # TensorFlow keeps a tuple attribute as a proxy (`_TupleWrapper`): a tuple to `isinstance`,
        # not to `issubclass` of its type (a check by type missed a swap in it: found by a review)
        self.pair = (keras.layers.Dense(3, name="pair_a"), keras.layers.Dense(3, name="pair_b"))
        self.index = 0

    @property
    def chosen(self):  # stock's walk reaches properties too
        return self.heads[self.index]

    def call(self, x):
        return (
            self.first(x)
            + self.second(x)
            + self.groups[0][0](x)
            + self.groups[1][0](x)
            + self.pair[0](x)
            - self.pair[1](x),
            self.head(x),
            self.heads[1](x),
        )


def _written_before_checked(monkeypatch) -> list[bool]:
    """Records, for each replay whose snapshots are taken, whether each was written as it was taken."""
    written, plan = [], state.Replay.plan
    monkeypatch.setattr(
        state.Replay, "plan", lambda replay, on=None: written.append(on is not None) or plan(replay, on)
    )
    return written


@pytest.mark.parametrize("change", ["swap", "reassign", "property", "nested", "tuple"])
@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_an_attribute_pointed_at_another_layer_walks_again(tmp_path, monkeypatch, change, suffix):
    """The model's variables stay the same objects, but stock's walk reaches layers by attribute
    paths: a replay wrote the old paths (swapped weights, found by a reviewing subagent). A
    blocking save writes the replay's snapshots before it checks the walk: they are written again."""
    model = _TwoHeads()
    model(np.ones((1, 4), "float32"))
    save_ours, save_stock = (
        (ksf.save_weights, keras.Model.save_weights)
        if suffix == ".weights.h5"
        else (ksf.save_model, keras.saving.save_model)
    )
    save_ours(model, tmp_path / f"first{suffix}")
    assert model in state._WALKS
    if change == "swap":
        model.first, model.second = model.second, model.first
    elif change == "reassign":
        model.head = model.heads[1]
    elif change == "property":
        model.index = 1
    elif change == "nested":  # item assignment in an inner list: Keras tracks nothing new
        model.groups[0][0], model.groups[1][0] = model.groups[1][0], model.groups[0][0]
    else:
        model.pair = (model.pair[1], model.pair[0])
    checks, holds = [], state.Replay.holds
    monkeypatch.setattr(state.Replay, "holds", lambda replay: checks.append(holds(replay)) or checks[-1])
    written_first = _written_before_checked(monkeypatch)
    save_ours(model, tmp_path / f"ours{suffix}")
    monkeypatch.undo()
    assert checks and not any(checks)
    assert written_first == [True]
    save_stock(model, tmp_path / f"stock{suffix}")
    if suffix == ".keras":
        assert member(tmp_path / f"ours{suffix}", WEIGHTS) == member(tmp_path / f"stock{suffix}", WEIGHTS)
    else:
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"stock{suffix}").read_bytes()


def test_a_flag_keras_own_saving_reads_walks_again(tmp_path):
    """`Conv1D.save_own_variables` leaves the bias out once `use_bias` is off (found by a reviewing
    subagent). The replay's tensors, written before the check, made a longer file: none of it is left."""
    model = keras.Sequential([keras.Input((5, 2)), keras.layers.Conv1D(4096, 2)])  # a bias of 16 KiB
    assert_saves_like_stock(model, tmp_path, "with-bias")
    ksf.save_weights(model, tmp_path / "with-bias.weights.h5")
    model.layers[0].use_bias = False
    ksf.save_weights(model, tmp_path / "ours.weights.h5")
    model.save_weights(tmp_path / "stock.weights.h5")
    assert (tmp_path / "ours.weights.h5").read_bytes() == (tmp_path / "stock.weights.h5").read_bytes()
    assert_saves_like_stock(model, tmp_path, "without-bias")


@keras.saving.register_keras_serializable(package="kerassave_fast_tests")
class ConfigCounter(keras.layers.Dense):
    """Counts its `get_config` calls in a plain attribute: saving it changes the model's state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.configs = 0

    def get_config(self):
        self.configs += 1
        return super().get_config()


def test_a_model_its_own_config_changes_is_serialized_once_per_save(tmp_path):
    """Its remembered walk stops holding at each save (the counter moved): the tensors written
    before the check are written again, the config is not serialized again (found by a review)."""
    model = keras.Sequential([keras.Input((3,)), ConfigCounter(2)])
    model.compile("adam", "mse")
    layer = model.layers[0]
    for i in range(4):
        model.train_on_batch(*_batch(model, seed=i))
        before = layer.configs
        ksf.save_model(model, tmp_path / f"{i}-ours.keras")
        assert layer.configs == before + 1  # as in stock's save
        keras.saving.save_model(model, tmp_path / f"{i}-stock.keras")
        assert members_but_date(tmp_path / f"{i}-ours.keras") == members_but_date(tmp_path / f"{i}-stock.keras")


def test_a_walk_that_can_no_longer_be_remembered_is_forgotten(tmp_path, monkeypatch):
    """LoRA makes a Dense layer save a kernel it computes: its walk is not remembered, and the one
    remembered before must not be replayed, written and found wrong at every later save (found by a review)."""
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16)])
    for _ in range(2):  # the walk and the layout remembered
        ksf.save_weights(model, tmp_path / "before.weights.h5")
    model.layers[0].enable_lora(2)
    written_first = _written_before_checked(monkeypatch)
    for i in range(3):
        ksf.save_weights(model, tmp_path / f"ours{i}.weights.h5")
        model.save_weights(tmp_path / f"stock{i}.weights.h5")
        assert (tmp_path / f"ours{i}.weights.h5").read_bytes() == (tmp_path / f"stock{i}.weights.h5").read_bytes()
    assert model not in state._WALKS
    assert written_first == []


class _KernelOnly(keras.layers.Dense):
    """The same layer, its class reassigned to one that saves the kernel alone."""

    def save_own_variables(self, store):
        store["0"] = self.kernel


def test_a_reassigned_class_walks_again(tmp_path):
    """A remembered walk records each object's class: `layer.__class__ = ...` changes what it saves
    (found by a review)."""
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16)])
    for _ in range(2):
        ksf.save_weights(model, tmp_path / "before.weights.h5")
    model.layers[0].__class__ = _KernelOnly
    ksf.save_weights(model, tmp_path / "ours.weights.h5")
    model.save_weights(tmp_path / "stock.weights.h5")
    assert (tmp_path / "ours.weights.h5").read_bytes() == (tmp_path / "stock.weights.h5").read_bytes()


def _attribute_state_in_python(model) -> list:
    """The attribute state as first written in Python (keras3/state.py's docstring says what it is),
    kept here as the oracle of the Rust core's walk."""
    found: list = []
    seen: set[int] = set()
    stack: list = [model]
    while stack:
        obj = stack.pop()
        kind = state._kind(obj)
        if kind == state._VALUE:
            found.append(obj)
        elif kind == state._OBJECT:
            found.append(("object", id(obj), type(obj)))
            if id(obj) not in seen:
                seen.add(id(obj))
                items = list(vars(obj).items())
                found.append(tuple(key for key, _ in items))
                stack.extend(value for _, value in reversed(items))
        elif kind == state._CONTAINER:
            if id(obj) in seen:
                found.append(("container", id(obj)))
                continue
            seen.add(id(obj))
            values = list(obj.values()) if isinstance(obj, dict) else list(obj)
            keys = tuple(k if isinstance(k, state._PLAIN) else id(k) for k in obj) if isinstance(obj, dict) else ()
            found.append(("container", id(obj), len(values), keys))
            stack.extend(reversed(values))
        else:
            found.append(None)
    return found


class _Odd(keras.layers.Layer):
    """Attributes of every kind the walk tells apart."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.pair = (inner, 3)  # kept by TensorFlow as a `_TupleWrapper` proxy
        loop = [1, "a"]
        loop.append(loop)  # a list holding itself (set past Keras' tracking, which cannot wrap it)
        object.__setattr__(self, "loop", loop)
        self.keyed = {inner: 1.5, 2: None, b"k": [4], (1, 2): inner}  # keys of other types by identity
        self.callback = print  # entered by neither walk
        self.numbers = np.arange(3)


@pytest.mark.parametrize("name", [*MODELS, "odd"])
def test_the_attribute_state_is_the_python_walks(name):
    if name == "odd":
        inner = keras.layers.Dense(2)
        model = keras.Sequential([keras.Input((2,)), inner, _Odd(inner)])
    else:
        model = MODELS[name]()
    state._KINDS.clear()  # each class decided again, as on a first save
    assert state._attribute_state(model) == _attribute_state_in_python(model)
    assert state._attribute_state(model) == _attribute_state_in_python(model)  # kinds cached


class _ReusedBuffer(keras.layers.Layer):
    """Saves two tensors from one buffer, changed in between: stock's store wrote the first already."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(3,), initializer="ones")

    def call(self, x):
        return x * self.w[0]

    def save_own_variables(self, store):
        buffer = np.array(self.w.numpy())
        store["0"] = buffer
        buffer += 1
        store["1"] = buffer

    def load_own_variables(self, store):
        self.w.assign(store["0"])


def test_a_value_that_is_not_a_variable_is_taken_when_stored(tmp_path):
    """An array a `save_own_variables` stores, then changes and stores again, is taken at once, as
    stock's store writes it at once."""
    model = keras.Sequential([keras.Input((3,)), _ReusedBuffer()])
    assert_saves_like_stock(model, tmp_path, "reused")
    with zipfile.ZipFile(tmp_path / "reused-ours.keras") as z, z.open(WEIGHTS) as f:
        with h5py.File(f) as h5:
            [group] = [g for g in h5["layers"].values()]
            assert list(group["vars"]["0"][()]) == [1, 1, 1] and list(group["vars"]["1"][()]) == [2, 2, 2]


class _Bare(keras.layers.Layer):
    pass


class _ListItems(dict):
    def items(self):  # pairs as lists
        return [[k, v] for k, v in dict.items(self)]


class _Reordered(dict):
    def items(self):
        return list(reversed(list(dict.items(self))))


class _RaisingDict(keras.layers.Layer):
    @property
    def __dict__(self):
        raise RuntimeError("no attributes today")


class _Unhashable(type(keras.layers.Layer)):
    __hash__ = None

    def __eq__(cls, other):
        return cls is other


class _HashRaising(type(keras.layers.Layer)):
    def __hash__(cls):
        raise ValueError("no hash")


class _Proxy:
    """Names its target's class (as wrapt's proxies do)."""

    def __init__(self, target):
        object.__setattr__(self, "_target", target)

    @property
    def __class__(self):
        return type(object.__getattribute__(self, "_target"))

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_target"), name)


class _NoDict:
    __slots__ = ()

    @property
    def __class__(self):
        return _Bare


def _odd(case: str):
    model = _Bare()
    if case == "dict subclass items as lists":
        model.x = 1
        object.__setattr__(model, "__dict__", _ListItems(vars(model)))
    elif case == "dict subclass items reordered":
        model.x, model.y = 1, "a"
        object.__setattr__(model, "__dict__", _Reordered(vars(model)))
    elif case == "__dict__ raising":
        object.__setattr__(model, "bad", _RaisingDict())
    elif case == "unhashable metaclass":
        model.u, model.v = _Unhashable("U", (keras.layers.Layer,), {})(), _Unhashable("V", (keras.layers.Layer,), {})()
    elif case == "metaclass hash raising":
        model.u = _HashRaising("B", (keras.layers.Layer,), {})()
    elif case == "proxy of a layer":
        inner = _Bare()
        inner.q = 3
        object.__setattr__(model, "p", _Proxy(inner))
    elif case == "no __dict__, naming a layer class":
        object.__setattr__(model, "nd", _NoDict())
    return model


@pytest.mark.parametrize(
    "case",
    [
        "dict subclass items as lists",
        "dict subclass items reordered",
        "__dict__ raising",
        "unhashable metaclass",
        "metaclass hash raising",
        "proxy of a layer",
        "no __dict__, naming a layer class",
    ],
)
def test_the_attribute_state_is_the_python_walks_on_odd_objects(case):
    """Same state, or the same error, as the Python walk (found by a review of the Rust port)."""
    model = _odd(case)
    outcomes = []
    for walk in (state._attribute_state, _attribute_state_in_python):
        state._KINDS.clear()
        try:
            outcomes.append(walk(model))
        except Exception as e:
            outcomes.append(type(e))
    assert outcomes[0] == outcomes[1]


class _SwappedIn(keras.layers.Layer):
    """Stores its averaged weights swapped in, then puts the live ones back (an EMA's way)."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(3,), initializer="ones")
        self.ema = self.add_weight(shape=(3,), initializer="zeros", trainable=False)

    def call(self, x):
        return x * self.w

    def save_own_variables(self, store):
        live = self.w.numpy()
        self.w.assign(self.ema)
        store["0"] = self.w
        self.w.assign(live)
        store["1"] = self.ema


def test_a_variable_changed_once_stored_is_saved_as_stored(tmp_path):
    """Stock's store writes a variable when it is stored: ours snapshots it then, not after the walk."""
    model = keras.Sequential([keras.Input((3,)), _SwappedIn()])
    assert_saves_like_stock(model, tmp_path, "swapped")
    ksf.save_weights(model, tmp_path / "ours.weights.h5")
    model.save_weights(tmp_path / "stock.weights.h5")
    with h5py.File(tmp_path / "ours.weights.h5") as ours, h5py.File(tmp_path / "stock.weights.h5") as stock:
        [layer] = list(stock["layers"])
        assert list(stock["layers"][layer]["vars"]["0"][()]) == [0, 0, 0]
        assert list(ours["layers"][layer]["vars"]["0"][()]) == [0, 0, 0]


class _NotPairs(dict):
    def items(self):
        return [(k, v, 0) for k, v in dict.items(self)]


def test_a_model_the_attribute_walk_cannot_read_saves_as_stock(tmp_path):
    """An object whose `__dict__.items()` is not pairs: stock's walk (by `dir`) saves it; ours
    walks as stock every time instead of failing (found by a review)."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    inner = _Bare()
    object.__setattr__(inner, "__dict__", _NotPairs(vars(inner)))
    object.__setattr__(model, "odd", inner)
    for name in ("first", "second"):
        assert_saves_like_stock(model, tmp_path, name)
