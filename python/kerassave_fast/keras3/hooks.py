"""The private Keras 3 pieces the fast paths lean on, checked once against the installed Keras.

Imports nothing of Keras at module level and nothing of ours: `api` asks `missing()` before it
imports the modules that use these pieces, so a Keras release that lacks or changed one sends
every Keras 3 save and load to stock, with one warning naming what is missing.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading
import warnings

# What `make compat` found: 3.12.4, 3.14.1 and 3.15.1 have every piece; 3.10, 3.11 and 3.13.2
# lack `safe_get_h5_*` and `resolve_sub_path` (stock's own checks of what a file may link to),
# so they run through stock. (Stock's zip-bomb limits, absent before 3.15 but in 3.12.4, are
# optional: keras_zip.py then applies 3.15's.)
SUPPORTED = "Keras 3.12.4, 3.14 and 3.15"

# (module, attribute, parameters it must accept, in this order when given as a tuple).
HOOKS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("keras.src.saving.saving_lib", "_CONFIG_FILENAME", ()),
    ("keras.src.saving.saving_lib", "_METADATA_FILENAME", ()),
    ("keras.src.saving.saving_lib", "_VARS_FNAME_H5", ()),
    ("keras.src.saving.saving_lib", "_ASSETS_DIRNAME", ()),
    ("keras.src.saving.saving_lib", "_serialize_model_as_json", ("model",)),
    ("keras.src.saving.saving_lib", "_write_to_zip_recursively", ("zipfile_to_save", "system_path", "zip_path")),
    ("keras.src.saving.saving_lib", "_model_from_config", ("config_json", "custom_objects", "compile", "safe_mode")),
    ("keras.src.saving.saving_lib", "_walk_saveable", ("saveable",)),
    (
        "keras.src.saving.saving_lib",
        "_save_state",
        ("saveable", "weights_store", "assets_store", "inner_path", "visited_saveables"),
    ),
    ("keras.src.saving.saving_lib", "_load_state", ("saveable", "weights_store", "assets_store", "inner_path")),
    ("keras.src.saving.saving_lib", "_raise_loading_failure", ("error_msgs", "warn_only")),
    ("keras.src.saving.saving_lib", "DiskIOStore", ("root_path", "archive", "mode")),
    ("keras.src.saving.saving_lib", "H5IOStore", ()),
    ("keras.src.saving.saving_lib", "get_attr_skipset", ("obj_type",)),
    ("keras.src.saving.saving_lib", "safe_get_h5_dataset", ("group", "name")),
    ("keras.src.saving.saving_lib", "safe_get_h5_group", ("parent", "name")),
    ("keras.src.saving.serialization_lib", "ObjectSharingScope", ()),
    ("keras.src.saving.serialization_lib", "SafeModeScope", ()),
    ("keras.src.saving.serialization_lib", "deserialize_keras_object", ()),
    ("keras.src.saving.object_registration", "CustomObjectScope", ()),
    ("keras.src.saving.object_registration", "GLOBAL_CUSTOM_OBJECTS", ()),
    ("keras.src.backend.common.stateless_scope", "StatelessScope", ("initialize_variables",)),
    ("keras.src.backend.common.global_state", "get_global_attribute", ()),
    ("keras.src.backend.common.global_state", "set_global_attribute", ()),
    ("keras.src.optimizers.base_optimizer", "BaseOptimizer", ()),
    ("keras.src.trainers.trainer", "Trainer", ()),
    ("keras.src.utils.file_utils", "resolve_path", ()),
    ("keras.src.utils.file_utils", "resolve_sub_path", ()),
    ("keras.src.utils.file_utils", "is_remote_path", ()),
    ("keras.src.legacy.saving.legacy_h5_format", "load_attributes_from_hdf5_group", ()),
    ("keras.src.legacy.saving.legacy_h5_format", "_legacy_weights", ()),
    ("keras.src.legacy.saving.legacy_h5_format", "_set_weights", ()),
    ("keras.src.legacy.saving.saving_utils", "model_metadata", ()),
    ("keras.src.legacy.saving.saving_utils", "compile_args_from_training_config", ()),
    ("keras.src.legacy.saving.saving_utils", "try_build_compiled_arguments", ()),
    ("keras.src.legacy.saving.saving_utils", "model_from_config", ()),
    ("keras.src.legacy.saving.json_utils", "get_json_type", ()),
    ("keras.src.legacy.saving.json_utils", "decode", ()),
    ("keras.src.legacy.saving.saving_options", "keras_option_scope", ()),
)


def _problem(module: str, attribute: str, parameters: tuple[str, ...]) -> str | None:
    """What is wrong with one hook in the installed Keras, or None."""
    try:
        value = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError):
        return f"{module}.{attribute} is missing"
    if not parameters:
        return None
    try:
        accepted = list(inspect.signature(value).parameters)
    except (TypeError, ValueError):
        return f"{module}.{attribute} has no signature to check"
    absent = [p for p in parameters if p not in accepted]
    if absent:
        return f"{module}.{attribute}({', '.join(accepted)}) lacks {', '.join(absent)}"
    return None


@functools.cache
def missing() -> tuple[str, ...]:
    """The hooks the installed Keras lacks or changed (computed once; `functools.cache` is
    thread-safe enough here: a second thread at worst computes the same answer again)."""
    return tuple(p for hook in HOOKS if (p := _problem(*hook)) is not None)


_warned = threading.Event()


def usable() -> bool:
    """Whether the Keras 3 fast paths can run; warns once, naming what is missing, when not."""
    problems = missing()
    if problems and not _warned.is_set():
        _warned.set()
        import keras

        warnings.warn(
            f"kerassave_fast: Keras {keras.__version__} is outside what the fast paths were checked against "
            f"({SUPPORTED}): {'; '.join(problems)}. Keras 3 saves and loads go to stock Keras.",
            stacklevel=3,
        )
    return not problems
