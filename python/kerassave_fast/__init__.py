"""kerassave_fast: drop-in, Rust-accelerated `save_model` / `load_model` for Keras on TensorFlow.

Files are laid out exactly as stock Keras lays them out: ours load in stock Keras, stock's load here.
`install()` routes Keras' own saving functions and `Model` methods through us (so does
`KERASSAVE_FAST=1` in the environment, at import).
"""

import os as _os

from ._core import BadKerasZipFile, KerasSaveError
from .api import (
    export_saved_model,
    legacy_keras_requested,
    load_model,
    load_model_as,
    load_weights,
    save_model,
    save_weights,
)
from .install import install, installed, uninstall
from .overwrite import OverwriteRefused

__all__ = [
    "BadKerasZipFile",
    "KerasSaveError",
    "OverwriteRefused",
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
]
__version__ = "0.1.0"

if _os.environ.get("KERASSAVE_FAST", "") in ("1", "true", "True"):
    install()
