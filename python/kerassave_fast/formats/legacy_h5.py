"""Legacy HDF5 `.h5` files, either flavour: a whole model (`model.save("m.h5")`) or, for tf_keras,
its weights alone (`model.save_weights("w.h5")`).

The flavour says what stock's writer (Keras 3 `legacy_h5_format`, tf_keras `hdf5_format`) would
store, naming variables instead of copying them; this module turns it into stock's sequence of
h5py calls (weights_h5.WeightsPlan), which h5py lays out once per architecture and the Rust core
fills with the tensors' bytes.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..asynchronous import Write
from ..tensors import snapshots
from .weights_h5 import Compression, WeightsPlan, write_plan

NamedVariables = list[tuple[bytes, object]]  # (weight name as stock encodes it, variable)


@dataclass
class LegacyH5Contents:
    """What stock's legacy writer stores, in its order, as the model's flavour describes it."""

    # `save_attributes_to_hdf5_group` of the flavour: splits long name lists over several attributes.
    save_attributes: Callable[[object, str, list], None]
    layer_names: list[bytes]
    backend: bytes
    keras_version: bytes
    layers: list[tuple[str, NamedVariables]]  # one group per layer, sorted by name as stock sorts them
    top_level: NamedVariables
    # For a whole model: the root attributes (`model_config`, `training_config`, ...), and the
    # optimizer's variables when stock would write `optimizer_weights`.
    root_attributes: dict | None = None
    optimizer: NamedVariables | None = None


def weights_contents(model, stock_module, backend: str, keras_version: str, name_of, top_level) -> LegacyH5Contents:
    """What the flavour's `save_weights_to_hdf5_group` writes. `stock_module`: the flavour's legacy
    HDF5 module (its `save_attributes_to_hdf5_group` and `_legacy_weights`); `name_of(variable)`:
    the weight's name as the flavour records it; `top_level`: the model's own variables."""
    return LegacyH5Contents(
        save_attributes=stock_module.save_attributes_to_hdf5_group,
        layer_names=[layer.name.encode("utf8") for layer in model.layers],
        backend=backend.encode("utf8"),
        keras_version=str(keras_version).encode("utf8"),
        layers=[
            (layer.name, [(name_of(v).encode("utf8"), v) for v in stock_module._legacy_weights(layer)])
            for layer in sorted(model.layers, key=lambda x: x.name)
        ],
        top_level=[(name_of(v).encode("utf8"), v) for v in top_level],
    )


def encode_metadata(metadata: dict, get_json_type: Callable) -> dict:
    """The root attributes stock's `save_model_to_hdf5` writes for `model_metadata`: containers as
    UTF-8 JSON (with the flavour's `json_utils.get_json_type`), anything else as it is."""
    return {
        k: json.dumps(v, default=get_json_type).encode("utf8") if isinstance(v, dict | list | tuple) else v
        for k, v in metadata.items()
    }


class _AttributesOf:
    """Stands in for an h5py group for the flavour's `save_attributes_to_hdf5_group`."""

    def __init__(self, plan: WeightsPlan, path: str):
        self._plan, self._path = plan, path

    @property
    def attrs(self):  # not an attribute holding itself: that cycle kept the plan's snapshots alive until a GC
        return self

    def __setitem__(self, name: str, value) -> None:
        self._plan.add_attribute(self._path, name, value)


def _add_weights(plan: WeightsPlan, contents: LegacyH5Contents, group: str, weights: NamedVariables, arrays) -> None:
    """`save_subset_weights_to_hdf5_group` / `save_optimizer_weights_to_hdf5_group`: the names, then
    each tensor (the next of `arrays`, the snapshots of the plan's weights in its order)."""
    contents.save_attributes(_AttributesOf(plan, group), "weight_names", [name for name, _ in weights])
    for name, _ in weights:
        plan.add_snapshot(group, name.decode("utf-8", "surrogateescape"), next(arrays), created=True)


def text_attribute(h5, name: str) -> str | None:
    """A root attribute as stock's readers take it: None when absent, bytes decoded as UTF-8."""
    value = h5.attrs.get(name)
    return value.decode("utf-8") if hasattr(value, "decode") else value


def plan_legacy_h5(contents: LegacyH5Contents) -> WeightsPlan:
    """Stock's calls, in stock's order, for `contents`."""
    plan = WeightsPlan()
    weights_group = ""
    if contents.root_attributes is not None:
        for name, value in contents.root_attributes.items():
            plan.add_attribute("", name, value)
        weights_group = "model_weights"
        plan.add_group(weights_group)

    def under(name: str) -> str:
        return f"{weights_group}/{name}" if weights_group else name

    contents.save_attributes(_AttributesOf(plan, weights_group), "layer_names", contents.layer_names)
    plan.add_attribute(weights_group, "backend", contents.backend)
    plan.add_attribute(weights_group, "keras_version", contents.keras_version)
    groups = [(under(layer_name), weights) for layer_name, weights in contents.layers]
    groups.append((under("top_level_model_weights"), contents.top_level))
    if contents.optimizer:
        groups.append(("optimizer_weights", contents.optimizer))
    # Taken together (runs read by one op): only stock's attribute writer runs between, no user code
    arrays = snapshots([variable for _, weights in groups for _, variable in weights])
    for group, weights in groups:
        plan.add_group(group)
        _add_weights(plan, contents, group, weights, arrays)
    return plan


def prepare_save(
    contents: LegacyH5Contents,
    filepath: str,
    threads: int = 0,
    compression: Compression | None = None,
    alignment: int = 1,
) -> Write:
    """Writes the `.h5` file in two halves: this one snapshots the variables now and returns the
    second, which writes the file, replacing any old one only when complete. Like stock's writers,
    a whole model's makes its directory if missing, a weights file's does not."""
    plan = plan_legacy_h5(contents)
    directory = os.path.dirname(filepath)
    if directory and contents.root_attributes is not None:
        os.makedirs(directory, exist_ok=True)
    return functools.partial(write_plan, plan, filepath, threads, compression, alignment)
