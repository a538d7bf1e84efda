"""kerassave_fast: drop-in, Rust-accelerated `save_model` / `load_model` for Keras on TensorFlow.

Files are laid out exactly as stock Keras lays them out: ours load in stock Keras, stock's load here.
"""

from ._core import BadKerasZipFile, KerasSaveError
from .api import legacy_keras_requested, load_model, load_weights, save_model, save_weights

__all__ = [
    "BadKerasZipFile",
    "KerasSaveError",
    "legacy_keras_requested",
    "load_model",
    "load_weights",
    "save_model",
    "save_weights",
]
__version__ = "0.1.0"
