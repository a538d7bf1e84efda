"""kerassave_fast: drop-in, Rust-accelerated `save_model` / `load_model` for Keras on TensorFlow.

Files are laid out exactly as stock Keras lays them out: ours load in stock Keras, stock's load here.
`install()` routes Keras' own saving functions and `Model` methods through us (so does
`KERASSAVE_FAST=1` in the environment: at import, or when Keras is first imported after it).

The API is imported on first use, so that the command line's `inspect` and `verify`, which need
no model, start without importing Keras and TensorFlow (nor numpy, for `verify` of a `.keras`).
"""

from __future__ import annotations

import importlib
import os as _os

from ._core import BadKerasZipFile, KerasSaveError
from .install import install, installed, uninstall  # not lazily: the submodule's name would shadow it
from .overwrite import OverwriteRefused

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (the command line's start-up)
if TYPE_CHECKING:
    from .api import (
        export_saved_model,
        legacy_keras_requested,
        load_model,
        load_model_as,
        load_weights,
        save_model,
        save_weights,
    )
    from .asynchronous import SaveHandle
    from .mapped import Verification, verification

__all__ = [
    "BadKerasZipFile",
    "KerasSaveError",
    "OverwriteRefused",
    "SaveHandle",
    "Verification",
    "export_saved_model",
    "install",
    "installed",
    "legacy_keras_requested",
    "load_model",
    "load_model_as",
    "load_weights",
    "save_model",
    "save_weights",
    "uninstall",
    "verification",
]
# What `__all__` names and nothing above defined, imported on first use from its module (`api`
# unless listed here): each import is a share of the command line's start.
_MODULES = {"SaveHandle": ".asynchronous", "Verification": ".mapped", "verification": ".mapped"}
_LAZY = {name: _MODULES.get(name, ".api") for name in __all__ if name not in globals()}
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if _os.environ.get("KERASSAVE_FAST", "") in ("1", "true", "True"):
    from .install import install_with_keras

    install_with_keras()
