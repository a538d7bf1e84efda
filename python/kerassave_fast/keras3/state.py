"""Keras 3 glue: Keras walks the model and serializes it; we only change where tensor bytes go.

Saving runs Keras' own `_save_state` walk with a store that records zero-copy views instead of
writing. Loading builds the model with its variables left uninitialized (their initializers
would only be overwritten), then runs Keras' own `_load_state` walk with a store that serves
tensors already read in parallel, which the variables adopt without a copy.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import math
import pathlib
import random
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import h5py
import numpy as np
from h5py import h5l
from keras.src import backend
from keras.src.backend.common import global_state
from keras.src.backend.common.stateless_scope import StatelessScope
from keras.src.optimizers.base_optimizer import BaseOptimizer
from keras.src.saving import saving_lib
from keras.src.saving.keras_saveable import KerasSaveable
from keras.src.saving.object_registration import CustomObjectScope
from keras.src.saving.serialization_lib import (
    ObjectSharingScope,
    SafeModeScope,
    deserialize_keras_object,
)
from keras.src.utils import dtype_utils

from .._core import KerasSaveError, attribute_state
from ..formats.weights_h5 import PlannedDataset, WeightsPlan, consistent
from ..tensors import adoptable, adoptable_tensor, snapshots


def serialize_model_as_json(model) -> tuple[str, str]:
    """(config.json, metadata.json) as stock's `saving_lib.save_model` writes them."""
    return saving_lib._serialize_model_as_json(model)


def stock_load_model(filepath: str, custom_objects, compile: bool, safe_mode: bool):
    return saving_lib.load_model(filepath, custom_objects, compile, safe_mode)


def shard_size(array) -> float:
    """A tensor's bytes as stock's `ShardedH5IOStore` counts them when it cuts shards (a float)."""
    return math.prod(array.shape) * dtype_utils.dtype_size(backend.standardize_dtype(array.dtype)) / 8


def larger_than_a_shard(name: str, size: float, max_shard_bytes: float) -> ValueError:
    """Stock's error for a tensor that no shard can hold."""
    readable = saving_lib.readable_memory_size
    return ValueError(
        f"The size of {name} is {readable(size)} which exceeds the maximum shard size {readable(max_shard_bytes)}. "
        "You can increase the `max_shard_size` parameter to accommodate the size."
    )


def _vars_group(path: str) -> str:
    """Where stock's `H5IOStore` keeps the variables of the object at `path`."""
    return f"{path}/vars" if path else "vars"


class _WeightsRecorder(saving_lib.H5IOStore):
    """Stands in for stock's write-mode `H5IOStore`: records each group and tensor in stock's order."""

    def __init__(self, plan: WeightsPlan):  # no super().__init__: there is no file to open
        self.mode = "w"
        self.plan = plan
        self._path = ""
        self._group_made = False
        self._keys: list[str] = []
        self.sources: list = []  # what each dataset was read from
        # The object whose name each group's `name` attribute holds (None: not found), in order.
        self.named: list = []
        # Whether every object saved its variables with stock's `save_own_variables`: one of its own
        # may pick what it saves by Python state, which a replay of this walk would not see change.
        self.replayable = True

    def __bool__(self) -> bool:
        return True

    def make(self, path, metadata=None):
        if not isinstance(metadata, dict | None):
            raise ValueError(f"`metadata` should be a dict or `None`. Received: {metadata}")
        self._path, self._group_made, self._keys = path, bool(metadata), []
        caller = sys._getframe(1)
        if not _saves_as_stock(caller):
            self.replayable = False
        if metadata:
            self.plan.add_group(_vars_group(path), metadata)
            self.named.append(_saveable_of_caller(caller, metadata))
        return self

    def __setitem__(self, key, value):
        if not isinstance(value, backend.Variable):
            _refuse_as_stock(value)
        if not self._group_made:  # stock creates a group without metadata on its first tensor
            self.plan.add_group(_vars_group(self._path), None)
            self._group_made = True
        # Taken now, as stock's store writes it now: a `save_own_variables` may change the variable
        # (or reuse the array) once stored, as one that stores averaged weights swapped in does.
        self.plan.add_dataset(_vars_group(self._path), key, value)
        self.sources.append(value)
        self._keys.append(key)

    def keys(self):
        return list(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._keys

    def close(self):
        pass


def _refuse_as_stock(value) -> None:
    """Stock's store refuses what `standardize_dtype` refuses (strings and bytes): a ValueError.
    A tensor's or array's own dtype is checked without converting it (the snapshot copies it once)."""
    dtype = getattr(value, "dtype", None)
    backend.standardize_dtype(dtype if dtype is not None else np.asarray(value).dtype)


def _saves_as_stock(frame) -> bool:
    """Whether the object stock's `_save_state` (the caller's frame) is saving uses a
    `save_own_variables` of Keras' own, which saves the object's variables and nothing it chooses."""
    if frame.f_code is not saving_lib._save_state.__code__:
        return False
    saveable = frame.f_locals.get("saveable")
    own = vars(saveable).get("save_own_variables") if hasattr(saveable, "__dict__") else None
    if own is not None and getattr(own, "func", None) is not _save_optimizer_variables:  # ours is stock's
        return False
    return getattr(getattr(type(saveable), "save_own_variables", None), "__module__", "").startswith("keras.")


_PLAIN = (bool, int, float, complex, str, bytes, type(None))
# What `_attribute_state` does with a value, by its class (decided once per class: the state of a
# model of 1,000 layers visits ~100,000 values, and three `isinstance` checks each cost a third of it).
_VALUE, _OBJECT, _CONTAINER, _OPAQUE = range(4)  # as the Rust core's `attribute_state` numbers them
_KINDS: dict[type, int] = {}


def _kind(obj) -> int:
    cls = type(obj)
    # A proxy (TensorFlow's `_TupleWrapper` of a tuple attribute) passes the `isinstance` checks of
    # the class it names, not of its own type: only a value whose class is its type is cached.
    cached = cls is obj.__class__
    try:
        kind = _KINDS.get(cls) if cached else None
    except TypeError:  # a metaclass that compares classes without hashing them
        kind, cached = None, False
    if kind is None:
        if isinstance(obj, _PLAIN):
            kind = _VALUE
        elif isinstance(obj, KerasSaveable):
            kind = _OBJECT
        elif isinstance(obj, list | tuple | dict):
            kind = _CONTAINER
        else:
            kind = _OPAQUE
        if cached:
            if len(_KINDS) > 10_000:  # classes made on the fly: keep none of them alive for good
                _KINDS.clear()
            _KINDS[cls] = kind
    return kind


def _attribute_state(model) -> list:
    """Everything stock's walk of `model` can depend on, as far as plain attributes show it: every
    Keras object reachable from it through attributes (lists, tuples and dicts entered) by
    identity, each plain attribute by value (a flag like `use_bias` or `lora_enabled`, an index a
    property reads). Stock's walk follows every attribute (properties too) and names paths after
    them: a reassigned, swapped or nested-moved layer, or a flag a `save_own_variables` reads,
    changes this state. Each object and container is entered once (a list holding itself ends)."""
    return attribute_state(model, _KINDS, _kind, _PLAIN)  # the walk, in the Rust core


def _saveable_of_caller(frame, metadata: dict):
    """The object stock's `_save_state` (the caller's frame) records `metadata` of: its `name`
    is written as an attribute, so a remembered walk holds only while it keeps that name."""
    if frame.f_code is not saving_lib._save_state.__code__:
        return None
    saveable = frame.f_locals.get("saveable")
    return saveable if metadata == {"name": getattr(saveable, "name", None)} else None


def _optimizers_of(model) -> list[BaseOptimizer]:
    optimizer = getattr(model, "optimizer", None)
    found = []
    while isinstance(optimizer, BaseOptimizer) and optimizer not in found:
        found.append(optimizer)
        optimizer = getattr(optimizer, "inner_optimizer", None)  # LossScaleOptimizer wraps another
    return found


def _save_optimizer_variables(optimizer: BaseOptimizer, store) -> None:
    """`BaseOptimizer.save_own_variables` without its `.numpy()` copy of every slot, for our
    recording store; any other store (a stock save of the same model meanwhile) gets stock's method."""
    if not isinstance(store, _WeightsRecorder):
        BaseOptimizer.save_own_variables(optimizer, store)
        return
    for i, variable in enumerate(optimizer.variables):
        store[str(i)] = variable


# Saves in progress that rely on each optimizer's shim (by id): several threads may save one model.
_SHIM_LOCK = threading.Lock()
_SHIM_USERS: dict[int, int] = {}


@contextlib.contextmanager
def _optimizer_state_by_reference(optimizers: list[BaseOptimizer]):
    shimmed = []
    with _SHIM_LOCK:
        for optimizer in optimizers:
            if type(optimizer).save_own_variables is not BaseOptimizer.save_own_variables:
                continue  # its class saves its own way
            users = _SHIM_USERS.get(id(optimizer), 0)
            if users == 0:
                if "save_own_variables" in vars(optimizer):
                    continue  # set on the instance by someone else: theirs
                optimizer.save_own_variables = functools.partial(_save_optimizer_variables, optimizer)
            _SHIM_USERS[id(optimizer)] = users + 1
            shimmed.append(optimizer)
    try:
        yield
    finally:
        with _SHIM_LOCK:
            for optimizer in shimmed:
                _SHIM_USERS[id(optimizer)] -= 1
                if not _SHIM_USERS[id(optimizer)]:
                    del _SHIM_USERS[id(optimizer)]
                    vars(optimizer).pop("save_own_variables", None)


_SKIPSET_TYPES = ("Layer", "Functional", "Sequential", "Optimizer", "Metric", "Loss", "Operation")


def _cache_attr_skipsets() -> None:
    """Makes stock's per-type attribute skip sets cached, as intended.

    `saving_lib.get_attr_skipset` stores its result under "saving_attr_skipset_<type>" but looks
    for "saving_attr_skiplist_<type>", so every call rebuilds a reference `Layer()` to `dir()`: a
    third of stock's walk of a ResNet50. Storing the same set under the key it reads changes nothing else.
    """
    for obj_type in _SKIPSET_TYPES:
        if global_state.get_global_attribute(f"saving_attr_skiplist_{obj_type}", None) is None:
            skipset = saving_lib.get_attr_skipset(obj_type)
            global_state.set_global_attribute(f"saving_attr_skiplist_{obj_type}", skipset)


def _stand_in(array: np.ndarray) -> np.ndarray:
    """An array of `array`'s shape and dtype that holds one element."""
    return np.broadcast_to(np.zeros((), array.dtype), array.shape)


class _AssetsRecorder(saving_lib.DiskIOStore):
    """Stock's write-mode assets store, noting whether any object saved assets."""

    used = False

    def make(self, path):
        self.used = True
        return super().make(path)


class NoAssets:
    """The assets store of a walk that saved no assets: nothing to write, nothing to delete."""

    working_dir = None

    def close(self) -> None:
        pass


@dataclass
class _RememberedWalk:
    """What stock's walk recorded for a model, and what it depended on (all held weakly)."""

    include_optimizer: bool
    assets_checked: bool  # whether the walk had an assets store to find that no object saves assets
    variables: list  # weak references to every variable of the model and its optimizers, in order
    plan: WeightsPlan  # its datasets' arrays are stale: each save snapshots their sources again
    sources: list  # weak references to the variable each dataset was read from
    named: list  # (weak reference to an object, the name its group's attribute holds)
    attribute_state: list  # `_attribute_state` of the model when walked
    # Whether a save may write its snapshots before checking that it holds: not while the last
    # replay's check failed (a model that changes between saves, whose tensors would be written twice).
    speculative: bool = True

    def same_variables(self, variables: list) -> bool:
        return len(variables) == len(self.variables) and all(
            r() is v for r, v in zip(self.variables, variables, strict=True)
        )

    def holds(self, model, variables: list) -> bool:
        """Whether the walk would record the same plan now: nothing it depended on has changed."""
        if not self.same_variables(variables):
            return False
        if any(getattr(r(), "name", None) != name for r, name in self.named):  # a layer renamed
            return False
        try:
            return _attribute_state(model) == self.attribute_state  # a layer reached by another path, a flag
        except Exception:  # an object the walk cannot read (stock's walk may still): walk as stock
            return False


@dataclass
class Replay:
    """A remembered walk about to be replayed for `model`. Its snapshots may be taken (`plan`), and
    written, before `holds` confirms the walk still holds: a blocking save writes the tensors while
    it checks, and discards them if it does not."""

    walk: _RememberedWalk
    model: object
    variables: list  # the model's and its optimizers' variables when the save began

    @property
    def template(self) -> WeightsPlan:
        """The walk's plan, each dataset's array a stand-in of the shape and dtype it recorded."""
        return self.walk.plan

    def plan(self, on_snapshot: Callable[[PlannedDataset], object] | None = None) -> WeightsPlan | None:
        """The walk's plan over fresh snapshots, each dataset told to `on_snapshot` as it is taken;
        None if a variable is gone or its shape or dtype is no longer the one recorded."""
        sources = [r() for r in self.walk.sources]
        if any(s is None for s in sources):
            return None
        arrays = snapshots(sources)
        steps = []
        for step in self.walk.plan.steps:
            if isinstance(step, PlannedDataset):
                array = next(arrays)
                if array.shape != step.array.shape or array.dtype != step.array.dtype:
                    return None
                step = step.with_array(array)
                if on_snapshot is not None:
                    on_snapshot(step)
            steps.append(step)
        return WeightsPlan(steps)

    @property
    def speculative(self) -> bool:
        """Whether its snapshots may be written before `holds` is known (see `_RememberedWalk`)."""
        return self.walk.speculative

    def holds(self) -> bool:
        return self.walk.holds(self.model, self.variables)


_WALKS_LOCK = threading.Lock()
_WALKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _RememberedWalk


def _all_variables(model, optimizers: list[BaseOptimizer]) -> list:
    return list(model.variables) + [v for o in optimizers for v in o.variables]


def replay_walk(model, include_optimizer: bool = True, with_assets: bool = True) -> Replay | None:
    """The walk remembered for `model` (with an assets store if `with_assets`), not yet checked
    to still hold, or None."""
    with _WALKS_LOCK:
        remembered = _WALKS.get(model)
    if remembered is None or remembered.include_optimizer != include_optimizer:
        return None
    if with_assets and not remembered.assets_checked:
        return None
    variables = _all_variables(model, _optimizers_of(model))
    if not remembered.same_variables(variables):  # the cheap part of `holds`: no tensor written in vain
        return None
    return Replay(remembered, model, variables)


def plan_model_state(model, include_optimizer: bool = True, with_assets: bool = True):
    """Walks `model` as stock saving does; returns its weights plan and a temporary assets store.

    The caller closes the assets store (it deletes the temporary directory) once the assets are written.

    Stock's walk costs more than the snapshots it leads to: it is remembered per model and replayed
    while the model and its optimizers have the same variables, when everything it saved was one of
    those variables and a walk with an assets store found that no object saves assets. Anything else
    (a layer storing computed values, assets, a new optimizer) walks every time.
    """
    replay = replay_walk(model, include_optimizer, with_assets)
    if replay is not None:
        plan = replay.plan() if replay.holds() else None
        if plan is not None:
            replay.walk.speculative = True
            return plan, NoAssets() if with_assets else None
        replay.walk.speculative = False  # until a replay holds again, or a new walk replaces it
    _cache_attr_skipsets()
    optimizers = _optimizers_of(model)
    variables = _all_variables(model, optimizers)
    recorder = _WeightsRecorder(WeightsPlan())
    assets = _AssetsRecorder(saving_lib._ASSETS_DIRNAME, mode="w") if with_assets else None
    skipped = set() if include_optimizer else {id(o) for o in optimizers}
    try:
        with _optimizer_state_by_reference(optimizers):
            saving_lib._save_state(
                model,
                weights_store=recorder,
                assets_store=assets,
                inner_path="",
                visited_saveables=skipped,
            )
    except BaseException:
        if assets is not None:
            assets.close()
        raise
    remembered = assets is None or not assets.used
    if remembered:
        remembered = _remember_walk(model, include_optimizer, assets is not None, variables, recorder, replay is None)
    if not remembered:  # a walk remembered before no longer describes the model
        with _WALKS_LOCK:
            _WALKS.pop(model, None)
    return recorder.plan, assets


def _remember_walk(
    model, include_optimizer: bool, assets_checked: bool, variables: list, recorder: _WeightsRecorder, speculative: bool
) -> bool:
    """Remembers the walk `recorder` made of `model`, if it can be replayed; returns whether it did."""
    known = {id(v) for v in variables}
    if not recorder.replayable or not all(id(s) in known for s in recorder.sources):
        return False
    if any(s is None for s in recorder.named):
        return False
    # The template keeps no snapshot (a view would keep the variable's old buffer alive after
    # training), only its shape and dtype: a stand-in of one element, broadcast.
    steps = [s.with_array(_stand_in(s.array)) if isinstance(s, PlannedDataset) else s for s in recorder.plan.steps]
    try:
        walk = _RememberedWalk(
            include_optimizer,
            assets_checked,
            [weakref.ref(v) for v in variables],
            WeightsPlan(steps),
            [weakref.ref(s) for s in recorder.sources],
            [(weakref.ref(s), s.name) for s in recorder.named],
            _attribute_state(model),
            speculative,
        )
    except Exception:  # not weakly referenceable, or not walkable (`_attribute_state`): walk every time
        return False
    with _WALKS_LOCK:
        _WALKS[model] = walk
    return True


# ---------------------------------------------------------------------------------------------
# Loading


class _CannotDefer(Exception):
    """The model's build did something that needs real variable values: build it the stock way."""


class _StockError(Exception):
    """`error`, raised by code run as stock's build runs it (the model's own `compile_from_config`,
    its variables initialized): stock's build would raise it too, so it is not built again."""

    def __init__(self, error: Exception):
        super().__init__(error)
        self.error = error


def _can_defer_initialization() -> bool:
    return (
        backend.backend() == "tensorflow"
        and "initialize_variables" in inspect.signature(StatelessScope).parameters
        and all(hasattr(backend.Variable, a) for a in ("_initialize", "_deferred_initialize", "_direct_assign"))
    )


def _uninitialized_registry() -> list:
    return global_state.get_global_attribute("uninitialized_variables", [], set_to_default=True)


def _compile_without_optimizer_build(model, compile_config: dict, initialize_built: Callable[[], None]):
    """`Trainer.compile_from_config` minus its last step, `optimizer.build(...)`.

    TensorFlow's optimizer keys its slots by the model's `tf.Variable`s, which do not exist until
    the weights are loaded; the loader builds it then. Returns the optimizer still to build, if any.
    A model that compiles its own way may read its weights there: `initialize_built()` first gives
    them the values stock's build would have, then it compiles as stock does (building it again
    would run its `__init__` a second time).
    """
    from keras.src.trainers.trainer import Trainer

    cls = type(model)
    if cls.compile is not Trainer.compile or cls.compile_from_config is not Trainer.compile_from_config:
        initialize_built()
        try:
            model.compile_from_config(compile_config)
        except Exception as e:
            raise _StockError(e) from e
        return None
    model.compile(**deserialize_keras_object(compile_config))
    optimizer = getattr(model, "optimizer", None)
    return optimizer if model.built and isinstance(optimizer, BaseOptimizer) and not optimizer.built else None


@dataclass
class BuiltModel:
    """A model built from its config, waiting for its saved state."""

    model: object
    # Variables created without running their initializers: loading gives them their values.
    uninitialized: list = field(default_factory=list)
    # Compiled, but its slot variables not yet created (they need the loaded weights to exist).
    optimizer_to_build: BaseOptimizer | None = None


def _build_deferred(build: Callable[[Callable[[], None]], BuiltModel], stock_build: Callable[[], object]) -> BuiltModel:
    """`build(initialize_built)` with the variables it creates left uninitialized (recorded in the
    result) unless it calls `initialize_built()`, which initializes those made so far; when that
    cannot be done, `stock_build()`, which initializes everything."""
    if not _can_defer_initialization():
        return BuiltModel(stock_build())
    first_new = len(_uninitialized_registry())
    names_used = copy.copy(global_state.get_global_attribute("object_name_uids"))

    def initialize_built() -> None:
        registry = _uninitialized_registry()
        made, registry[first_new:] = registry[first_new:], []
        _initialize_leftovers(made)

    # Keras draws a seed for each initializer or SeedGenerator made without one (from Python's
    # process-wide `random`: a thread drawing from it during a failed first attempt draws again after).
    seeds = random.getstate()
    try:
        built = build(initialize_built)
    except _StockError as e:
        stock_error = e.error
    except Exception:
        del _uninitialized_registry()[first_new:]
        # The stock build names its objects and draws their seeds as if the first attempt had not
        # been made (`dense`, not `dense_2`).
        global_state.set_global_attribute("object_name_uids", names_used)
        random.setstate(seeds)
        return BuiltModel(stock_build())
    else:
        registry = _uninitialized_registry()
        built.uninitialized = registry[first_new:]
        del registry[first_new:]
        return built
    raise stock_error  # outside the handler: it keeps its own context


def _deserialize_uninitialized(deserialize: Callable[[], object]):
    with StatelessScope(initialize_variables=False) as scope:
        model = deserialize()
    if scope.state_mapping:
        raise _CannotDefer("a layer assigned variables while building")
    return model


def build_model(config_json: bytes | str, custom_objects, compile: bool, safe_mode: bool) -> BuiltModel:
    """Builds the model from its config like stock loading, without running variable initializers.

    Anything this cannot do falls back to stock's build, which initializes everything.
    """

    def build(initialize_built: Callable[[], None]) -> BuiltModel:
        config = json.loads(config_json)
        compile_config = config.get("compile_config") if compile else None
        config["compile_config"] = None
        optimizer = None
        with ObjectSharingScope():
            model = _deserialize_uninitialized(
                lambda: deserialize_keras_object(config, custom_objects, safe_mode=safe_mode)
            )
            if compile_config:
                with CustomObjectScope(custom_objects), SafeModeScope(safe_mode):
                    optimizer = _compile_without_optimizer_build(model, compile_config, initialize_built)
                model.compiled = True
        return BuiltModel(model, optimizer_to_build=optimizer)

    def stock_build():
        return saving_lib._model_from_config(config_json, custom_objects, compile, safe_mode)

    return _build_deferred(build, stock_build)


def build_model_with(deserialize: Callable[[], object]) -> BuiltModel:
    """`deserialize()` (a stock model build from a config), its variables left uninitialized when possible."""
    return _build_deferred(lambda _: BuiltModel(_deserialize_uninitialized(deserialize)), deserialize)


@contextlib.contextmanager
def initializing(built: BuiltModel, arrays=()):
    """While stock code assigns the model's variables, those built uninitialized take the assigned
    value as their first, and any of `arrays` (64-byte aligned, handed to no one else) assigned is
    adopted without a copy; at the end, any variable still uninitialized gets its initializer's value."""
    try:
        with _adopting(_variables_of(built), arrays):
            yield
    finally:
        _initialize_leftovers(built.uninitialized)


class _PreloadedWeights(saving_lib.H5IOStore):
    """Stock's read-mode `H5IOStore` over an open file, serving tensors already read in parallel."""

    def __init__(self, h5_file, arrays: dict):  # no super().__init__: the file is already open
        self.path_or_io = None
        self.archive = None
        self.mode = "r"
        self.io_file = None
        self.h5_file = h5_file
        self._h5_entry_path = None
        self._h5_entry_group = {}
        self._h5_entry_metadata = None
        self._h5_entry_initialized = False
        self._arrays = arrays

    def __getitem__(self, key):
        # A preloaded tensor already passed what stock's `safe_get_h5_dataset` checks of a dataset
        # (contiguous: neither virtual nor external; stored bytes == declared bytes); the link to it
        # must still be a hard one. Anything else takes stock's path, checks and errors.
        group = self._h5_entry_group
        if isinstance(group, h5py.Group) and isinstance(key, str) and "/" not in key:
            try:
                hard = group.id.links.get_info(key.encode()).type == h5l.TYPE_HARD
            except KeyError:
                hard = False
            # Served once: a second variable asking for the same tensor gets its own copy (stock's path).
            array = self._arrays.pop(f"{group.name}/{key}", None) if hard else None
            if array is not None:
                # Keras' own loaders hand it straight to a variable, which adopts its memory; code of
                # anyone else (a custom `load_own_variables`) may keep it, so it gets a copy, as from stock.
                return array if _called_from_keras() else np.array(array)
            if hard:
                consistent(saving_lib.safe_get_h5_dataset(group, key))
        return super().__getitem__(key)

    def close(self):
        pass


class _PreloadedShards(saving_lib.ShardedH5IOStore, _PreloadedWeights):
    """Stock's read-mode `ShardedH5IOStore` (a `.weights.json` and its shards) over shards already
    open, serving each shard's tensors read in parallel; stock's own code finds which shard holds what."""

    def __init__(self, filepath: str, shards: dict):  # shard file name -> (open h5py file, its arrays)
        self._shards = shards
        self._arrays_of = {id(h5): arrays for h5, arrays in shards.values()}
        super().__init__(filepath, mode="r")

    @property
    def _arrays(self) -> dict:
        return self._arrays_of[id(self.h5_file)]

    def _get_h5_file(self, path_or_io, mode=None):
        name = pathlib.Path(path_or_io).name
        if name not in self._shards:  # the map now names a shard it did not name when the load began
            raise KerasSaveError(f"{self.path}: the file changed while it was being loaded (shard {name!r})")
        return self._shards[name][0]

    def close(self):
        pass


# Stock's sharded store asks its base class for a tensor: a frame to look past to find who asked.
_STORE_FRAMES = {saving_lib.ShardedH5IOStore.__getitem__.__code__}


def _called_from_keras() -> bool:
    """Whether the code asking the store for a tensor (two frames up, past stock's store) is Keras' own."""
    frame = sys._getframe(2)
    while frame.f_code in _STORE_FRAMES and frame.f_back is not None:
        frame = frame.f_back
    return frame.f_globals.get("__name__", "").startswith("keras.")


def _convert_adopting(variable, loaded: dict, value, dtype=None):
    """`Variable._convert_to_tensor`, except a loaded array becomes a tensor over the same memory."""
    if loaded.get(id(value)) is value and adoptable(value):  # else stock's conversion, and its errors
        tensor = adoptable_tensor(value)
        if dtype is None or backend.standardize_dtype(dtype) == backend.standardize_dtype(tensor.dtype):
            return tensor
        return backend.cast(tensor, dtype)
    return type(variable)._convert_to_tensor(variable, value, dtype=dtype)


def _initialize_with(variable, value) -> None:
    """First assignment of a variable built uninitialized: its value becomes the variable's buffer."""
    variable._initialize(value)
    variable._initializer = None


@contextlib.contextmanager
def _adopting(variables, arrays):
    loaded = {id(a): a for a in arrays}
    hooked = []
    try:
        for v in variables:
            if "_convert_to_tensor" in vars(v) or "_direct_assign" in vars(v):
                continue
            v._convert_to_tensor = functools.partial(_convert_adopting, v, loaded)
            if v._value is None:
                v._direct_assign = functools.partial(_initialize_with, v)
            hooked.append(v)
        yield
    finally:
        for v in hooked:
            vars(v).pop("_convert_to_tensor", None)
            vars(v).pop("_direct_assign", None)


def _variables_of(built: BuiltModel) -> list:
    seen, found = set(), []
    candidates = [*built.uninitialized, *built.model.variables]
    for optimizer in _optimizers_of(built.model):
        candidates += optimizer.variables
    for v in candidates:
        if id(v) not in seen and hasattr(v, "_value"):
            seen.add(id(v))
            found.append(v)
    return found


def _initialize_leftovers(variables: list) -> None:
    """Variables the file did not provide get their initializers' values, as in a stock build."""
    for v in variables:
        if v._value is None:
            v._deferred_initialize()


def _slots_only_builds() -> set:
    """`build` methods of stock optimizers that only create slot variables from initializers.

    Others (Nadam, Adafactor and ScheduleFreeAdamW create or assign variables with values, custom
    ones may do anything) are built the stock way, slots initialized.
    """
    from keras.src import optimizers

    names = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adadelta", "Adamax", "Ftrl", "Lion", "Lamb")
    return {getattr(optimizers, n).build for n in names if hasattr(optimizers, n)}


def _build_optimizer(built: BuiltModel) -> None:
    """The optimizer build stock does at compile time, with its slots left uninitialized when possible."""
    optimizer, model = built.optimizer_to_build, built.model
    if type(optimizer).build not in _slots_only_builds():
        optimizer.build(model.trainable_variables)
        return
    first_new = len(_uninitialized_registry())
    try:
        with StatelessScope(initialize_variables=False) as scope:
            optimizer.build(model.trainable_variables)
        if scope.state_mapping:
            raise _CannotDefer("the optimizer assigned variables while building")
    except Exception:
        # Not expected of the builds above; a half-built optimizer cannot be built again, so leave
        # no variable uninitialized and let the error show.
        created = _uninitialized_registry()[first_new:]
        del _uninitialized_registry()[first_new:]
        for v in created:
            v._deferred_initialize()
        raise
    registry = _uninitialized_registry()
    built.uninitialized += registry[first_new:]
    del registry[first_new:]


def build_optimizer(model) -> BuiltModel:
    """`model.optimizer.build(model.trainable_variables)`, its slots left uninitialized when possible
    (returned in `uninitialized`: give them values under `initializing`)."""
    built = BuiltModel(model, optimizer_to_build=model.optimizer)
    _build_optimizer(built)
    return built


def _path_of(model, child) -> str:
    """The attribute path under which Keras' walk reaches `child` of `model`."""
    for attr, obj in saving_lib._walk_saveable(model):
        if obj is child:
            return attr
    return "optimizer"


def load_model_state(built: BuiltModel, h5_file, arrays: dict, assets_store, skip_mismatch=False) -> None:
    """Keras' own `_load_state` walk over preloaded tensors, which the variables adopt.

    An optimizer still to build is walked last: built once the weights exist, then given its state.
    Failures are collected and raised (or warned, with `skip_mismatch`) as stock does.
    """
    _load_from(built, _PreloadedWeights(h5_file, arrays), arrays.values, assets_store, skip_mismatch)


def load_sharded_state(built: BuiltModel, filepath: str, shards: dict, skip_mismatch=False) -> None:
    """`load_model_state` from a sharded `.weights.json`: `shards` maps each shard's file name to
    (its open h5py file, its tensors read ahead)."""
    store = _PreloadedShards(filepath, shards)

    def arrays_left():
        return [a for _, arrays in shards.values() for a in arrays.values()]

    _load_from(built, store, arrays_left, None, skip_mismatch)


def _load_from(built: BuiltModel, store, arrays_left: Callable[[], list], assets_store, skip_mismatch: bool) -> None:
    model, optimizer = built.model, built.optimizer_to_build
    failed, errors = set(), {}
    visited = {id(optimizer)} if optimizer is not None else set()
    walks = [(model, "")]
    try:
        while walks:
            saveable, inner_path = walks.pop(0)
            with _adopting(_variables_of(built), arrays_left()):
                saving_lib._load_state(
                    saveable,
                    weights_store=store,
                    assets_store=assets_store,
                    inner_path=inner_path,
                    skip_mismatch=skip_mismatch,
                    visited_saveables=visited,
                    failed_saveables=failed,
                    error_msgs=errors,
                )
            _initialize_leftovers(built.uninitialized)
            if saveable is model and optimizer is not None:
                _build_optimizer(built)
                visited.discard(id(optimizer))
                walks.append((optimizer, _path_of(model, optimizer)))
    finally:
        _initialize_leftovers(built.uninitialized)
    if failed:
        saving_lib._raise_loading_failure(errors, warn_only=skip_mismatch)
