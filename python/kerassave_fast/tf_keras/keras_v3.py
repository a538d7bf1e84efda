"""tf_keras glue for its own v3 `.keras` zip (tf_keras/src/saving/saving_lib.py): tf_keras
serializes the config and walks the model; we record where each tensor goes (saving) and serve
tensors the Rust core already read (loading). The zip itself is `formats/keras_zip`'s.

The flavour interface `formats/keras_zip` calls: `serialize_model_as_json`, `replay_walk`,
`plan_model_state`, `build_model`, `load_model_state`, `stock_load_model`.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import h5py
import numpy as np
from tf_keras.src.saving import saving_lib

from ..formats.weights_h5 import WeightsPlan, consistent
from ..tensors import adoptable, adoptable_tensor, bfloat16_bits, unmarked_bfloat16
from . import uninitialized


@contextlib.contextmanager
def _v3_saving():
    """What tf_keras' `save_model`/`load_model` set around their work (layers consult it)."""
    before = getattr(saving_lib._SAVING_V3_ENABLED, "value", False)
    saving_lib._SAVING_V3_ENABLED.value = True
    try:
        yield
    finally:
        saving_lib._SAVING_V3_ENABLED.value = before


def serialize_model_as_json(model) -> tuple[str, str]:
    """(config.json, metadata.json) as tf_keras' `saving_lib.save_model` writes them."""
    with _v3_saving(), saving_lib.ObjectSharingScope():
        config = saving_lib.serialize_keras_object(model)
    metadata = {
        "keras_version": saving_lib.keras.__version__,
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
    }
    return json.dumps(config), json.dumps(metadata)


class _VarsRecorder:
    """The `vars` group stock's `H5IOStore.make` returns, recording each tensor in stock's order."""

    def __init__(self, plan: WeightsPlan, group: str):
        self._plan, self._group, self._keys = plan, group, []

    def __setitem__(self, key, value):
        self._plan.add_dataset(self._group, key, value, bfloat16_attribute=False)  # as `group[key] = value`
        self._keys.append(key)

    def keys(self):
        return list(self._keys)

    def __len__(self):
        return len(self._keys)


class _WeightsRecorder:
    """Stands in for stock's write-mode `H5IOStore`: each `make` is a group made at once, as stock's."""

    def __init__(self, plan: WeightsPlan):
        self.plan = plan

    def __bool__(self) -> bool:
        return True

    def make(self, path):
        group = f"{path}/vars" if path else "vars"
        self.plan.add_group(group)
        return _VarsRecorder(self.plan, group)

    def close(self):
        pass


def _recording_by_reference(original: Callable, variables_of: Callable) -> Callable:
    """`original` (a stock `save_own_variables` that stores `v.numpy()` copies), except that for
    our recording store it records the variables themselves (read later as views, no copy)."""

    @functools.wraps(original)
    def save_own_variables(self, store):
        if not isinstance(store, _VarsRecorder):
            return original(self, store)
        for i, variable in enumerate(variables_of(self)):
            store[str(i)] = variable
        return None

    save_own_variables.recording_original = original
    return save_own_variables


_BY_REFERENCE_LOCK = threading.Lock()


def _record_by_reference() -> None:
    """Installs, once per process, the by-reference recording of tf_keras' base `Layer` and
    `Optimizer`: every other store (stock's own saves, on any thread) gets stock's method."""
    from tf_keras.src.engine.base_layer import Layer
    from tf_keras.src.optimizers.optimizer import Optimizer

    with _BY_REFERENCE_LOCK:
        if not hasattr(Layer.save_own_variables, "recording_original"):
            weights = lambda layer: layer._trainable_weights + layer._non_trainable_weights  # noqa: E731
            Layer.save_own_variables = _recording_by_reference(Layer.save_own_variables, weights)
        if not hasattr(Optimizer.save_own_variables, "recording_original"):
            Optimizer.save_own_variables = _recording_by_reference(Optimizer.save_own_variables, lambda o: o.variables)


def replay_walk(model, include_optimizer: bool = True) -> None:
    """No walk of tf_keras is remembered (see `keras3.state.replay_walk`): each save walks."""
    return None


def plan_model_state(model, include_optimizer: bool = True):
    """tf_keras' own `_save_state` walk; returns the weights plan and a temporary assets store.

    Layers and optimizers of tf_keras' base classes record their variables by reference; a class
    with its own `save_own_variables` hands over what it stores for stock. The caller closes the
    assets store.
    """
    if not include_optimizer:  # stock refuses every keyword argument for this format
        raise ValueError("`include_optimizer` is not supported with the native TF-Keras format")
    _record_by_reference()
    plan = WeightsPlan()
    assets = saving_lib.DiskIOStore(saving_lib._ASSETS_DIRNAME, mode="w")
    try:
        with _v3_saving():
            saving_lib._save_state(
                model,
                weights_store=_WeightsRecorder(plan),
                assets_store=assets,
                inner_path="",
                visited_trackables=set(),
            )
    except BaseException:
        assets.close()
        raise
    return plan, assets


@dataclass
class BuiltModel:
    model: object
    uninitialized: uninitialized.Uninitialized


def build_model(config_json: bytes | str, custom_objects, compile: bool, safe_mode: bool) -> BuiltModel:
    """The model from `config.json`, as tf_keras' `saving_lib.load_model` builds it, the weights the
    file replaces left uninitialized."""
    config = json.loads(config_json)
    if not compile:
        config["compile_config"] = None
    with (
        _v3_saving(),
        saving_lib.ObjectSharingScope(),
        uninitialized.building(config, custom_objects) as built_uninitialized,
    ):
        model = saving_lib.deserialize_keras_object(config, custom_objects, safe_mode=safe_mode)
    return BuiltModel(model, built_uninitialized)


class _PreloadedVars:
    """A `vars` group of the open file, serving the tensors already read (others through h5py)."""

    def __init__(self, group: h5py.Group, arrays: dict):
        self._group, self._arrays = group, arrays

    def keys(self):
        return self._group.keys()

    def __len__(self):
        return len(self._group)

    def __contains__(self, key):
        return key in self._group

    def __getitem__(self, key):
        # Served once; anyone else asking for it (or a tensor not read by offset) gets h5py's.
        array = self._arrays.pop(f"{self._group.name}/{key}", None)
        if array is not None:
            array = bfloat16_bits(array)
            # tf_keras' own loaders assign it at once: a tensor over our buffer saves TensorFlow a
            # conversion copy. Anyone else's code (a custom `load_own_variables`) gets its own copy.
            from_tf_keras = sys._getframe(1).f_globals.get("__name__", "").startswith("tf_keras.")
            return adoptable_tensor(array) if from_tf_keras and adoptable(array) else np.array(array)
        dataset = consistent(self._group[key])
        if unmarked_bfloat16(dataset.dtype):
            return bfloat16_bits(dataset[()])
        return dataset


class _PreloadedWeights:
    """Stock's read-mode `H5IOStore` over the open file (its `get` exactly), serving preloaded tensors."""

    def __init__(self, h5_file: h5py.File, arrays: dict):
        self.h5_file, self._arrays = h5_file, arrays

    def get(self, path):
        if not path:
            return _PreloadedVars(self.h5_file["vars"], self._arrays)
        if path in self.h5_file and "vars" in self.h5_file[path]:
            return _PreloadedVars(self.h5_file[path]["vars"], self._arrays)
        return {}

    def close(self):
        pass


def load_model_state(built: BuiltModel, h5_file, arrays: dict, assets_store) -> None:
    """tf_keras' own `_load_state` walk; each variable is assigned its tensor as read."""
    with _v3_saving():
        saving_lib._load_state(
            built.model,
            weights_store=_PreloadedWeights(h5_file, arrays),
            assets_store=assets_store,
            inner_path="",
            visited_trackables=set(),
        )
    built.uninitialized.initialize_leftovers()


def stock_load_model(filepath: str, custom_objects, compile: bool, safe_mode: bool):
    return saving_lib.load_model(filepath, custom_objects, compile, safe_mode)


def can_save_fast(path: str | None, save_format, kwargs: dict) -> bool:
    """Whether tf_keras' `save_model(model, path, save_format=..., **kwargs)` writes its v3 zip
    (stock refuses any keyword argument there: that refusal stays stock's), in eager mode."""
    import tensorflow as tf
    from tf_keras.src.saving import saving_api

    # Another suffix in this format is stock's error ("Invalid `filepath` argument").
    if path is None or not path.endswith(".keras") or kwargs or not tf.executing_eagerly():
        return False
    try:
        return saving_api.get_save_format(path, save_format) == "keras"
    except ValueError:  # stock's error for an unknown format
        return False


def can_load_fast(path: str | None, kwargs: dict) -> bool:
    """Whether tf_keras' `load_model(path, **kwargs)` reads `path` as its v3 zip, in eager mode."""
    import os
    import zipfile

    import tensorflow as tf

    if path is None or kwargs or not tf.executing_eagerly():
        return False
    return path.endswith(".keras") and os.path.isfile(path) and zipfile.is_zipfile(path)
