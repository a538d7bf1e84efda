"""The public API, with stock's signatures: dispatch on the Keras flavour and the file format.

Accelerated: Keras 3 models to and from local `.keras` zips and `.weights.h5` files. Everything
else goes to the stock implementation of the model's flavour, with stock behaviour.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import warnings

from .formats import keras_zip, weights_file

_LEGACY_KERAS_VALUES = ("true", "True", "1")  # tensorflow/python/util/lazy_loader.py


def legacy_keras_requested() -> bool:
    """Whether `tf.keras` is tf_keras (Keras 2) here: TensorFlow's own rule, `TF_USE_LEGACY_KERAS`."""
    return os.environ.get("TF_USE_LEGACY_KERAS", None) in _LEGACY_KERAS_VALUES


def _flavour(model) -> str:
    """'keras3' or 'tf_keras', from the model's class."""
    import keras

    if isinstance(model, keras.Model):
        return "keras3"
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is not None and isinstance(model, tf_keras.Model):
        return "tf_keras"
    raise TypeError(
        "`model` must be a Keras model (a `keras.Model` or a `tf_keras.Model`). "
        f"Received: model={model!r} of type {type(model)}"
    )


def _local_path(filepath) -> str | None:
    """`filepath` as a local path string, or None for file objects and remote (gs://, hf://) paths."""
    if not isinstance(filepath, str | os.PathLike):
        return None
    path = os.fspath(filepath)
    if not isinstance(path, str) or "://" in path:
        return None
    return path


@contextlib.contextmanager
def _no_gc_pauses():
    """Keeps Python's cyclic GC from pausing inside a save or load (a full collection of a process
    holding TensorFlow and a big model can cost more than a ResNet50 load). It runs again afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _threads(value) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`threads` must be a positive integer or None. Received: threads={value!r}")
    return value


def _may_write(filepath, overwrite: bool) -> bool:
    """Stock's overwrite rule: ask on a terminal; without one, never clobber silently."""
    try:
        exists = os.path.exists(filepath)
    except TypeError:
        return True
    if not exists or overwrite:
        return True
    if sys.stdin is not None and sys.stdin.isatty():
        from keras.src.utils import io_utils

        return io_utils.ask_to_proceed_with_overwrite(filepath)
    raise FileExistsError(
        f"{filepath} already exists and overwrite=False; no terminal to ask whether to replace it "
        "(pass overwrite=True to replace it)."
    )


@contextlib.contextmanager
def _compile_config_kept(model):
    """Undoes a stock side effect: Keras 3's legacy `.h5` save pops "optimizer" out of the model's
    compile config in place (legacy/saving/saving_utils.py `model_metadata`), so every later save
    of the model would record no optimizer."""
    compile_config = getattr(model, "_compile_config", None)
    kept = dict(compile_config.config) if compile_config is not None else None
    try:
        yield
    finally:
        if kept is not None:
            compile_config.config.clear()
            compile_config.config.update(kept)


def save_model(model, filepath, overwrite=True, save_format=None, **kwargs):
    """Saves a model (architecture, weights, optimizer state) as stock Keras does, faster.

    Args:
        model: a Keras 3 `keras.Model` or a tf_keras `tf_keras.Model`; the flavour picks the
            stock behaviour to follow.
        filepath: `str` or `pathlib.Path`. `.keras` (Keras v3 zip), `.h5` (legacy HDF5), or for
            tf_keras a SavedModel directory.
        overwrite: whether to replace an existing file. If False, ask on a terminal; without
            one, raise `FileExistsError`.
        save_format: as in stock (`"keras"`, `"h5"`, `"tf"` for tf_keras; deprecated in Keras 3).
        **kwargs: stock's `include_optimizer`, `signatures`, `options`, `save_traces` (tf_keras
            SavedModel), `zipped` (Keras 3), plus our own `threads` (I/O threads, default one
            per core) and `compression` (reserved: only `None` for now).

    The `.keras` file is byte-layout-compatible with stock's: it loads in stock Keras, and a save
    that fails leaves any previous file untouched.
    """
    threads = _threads(kwargs.pop("threads", None))
    compression = kwargs.pop("compression", None)
    if compression is not None:
        raise ValueError(f"`compression` is not supported yet; only None is. Received: compression={compression!r}")
    flavour = _flavour(model)
    if not _may_write(filepath, overwrite):
        return None
    path = _local_path(filepath)
    if flavour == "tf_keras":
        import tf_keras

        return tf_keras.saving.save_model(model, filepath, overwrite=True, save_format=save_format, **kwargs)

    import keras

    include_optimizer = kwargs.get("include_optimizer", True)
    fast = (
        path is not None
        and path.endswith(".keras")
        and kwargs.get("zipped", True) in (None, True)
        and not save_format
        and set(kwargs) <= {"include_optimizer", "zipped"}
    )
    if not fast:
        if save_format:
            kwargs["save_format"] = save_format
        with _compile_config_kept(model):
            return keras.saving.save_model(model, filepath, overwrite=True, **kwargs)
    if not model.built:
        warnings.warn(
            "You are saving a model that has not yet been built. It might not contain any weights yet. "
            "Consider building the model first by calling it on some data.",
            stacklevel=2,
        )
    with _no_gc_pauses():
        keras_zip.save(model, path, include_optimizer=include_optimizer, threads=threads)
    return None


def load_model(filepath, custom_objects=None, compile=True, safe_mode=True, **kwargs):
    """Loads a model saved by `save_model` or by stock Keras.

    Args:
        filepath: `str` or `pathlib.Path` of a `.keras` zip, a legacy `.h5` file or (tf_keras) a
            SavedModel directory.
        custom_objects: mapping of names to custom classes or functions used in the model.
        compile: whether to compile the model after loading, as it was when saved.
        safe_mode: refuse `lambda` deserialization (Keras v3 format), as stock does.
        **kwargs: our own `threads` (I/O threads, default one per core); for tf_keras, stock's
            `options`.

    The flavour follows TensorFlow's rule for `tf.keras`: tf_keras when `TF_USE_LEGACY_KERAS` is
    `1`/`true`, else Keras 3.
    """
    threads = _threads(kwargs.pop("threads", None))
    if legacy_keras_requested():
        import tf_keras

        return tf_keras.saving.load_model(
            filepath, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode, **kwargs
        )
    import keras

    if kwargs:
        raise ValueError(f"The following argument(s) are not supported: {list(kwargs)}")
    path = _local_path(filepath)
    if path is None or not path.endswith(".keras") or os.path.isdir(path):
        return keras.saving.load_model(filepath, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode)
    if not os.path.exists(path):
        raise ValueError(
            f"File not found: filepath={filepath}. Please ensure the file is an accessible `.keras` zip file."
        )
    with _no_gc_pauses():
        return keras_zip.load(path, custom_objects, compile, safe_mode, threads)


def save_weights(model, filepath, overwrite=True, **kwargs):
    """Saves only the weights (and optimizer state) of a model, as `model.save_weights` does.

    Keras 3: `.weights.h5` files are written by the fast path (same layout as stock); sharded
    saves (`max_shard_size`) go to stock. tf_keras: stock `model.save_weights`.
    """
    threads = _threads(kwargs.pop("threads", None))
    flavour = _flavour(model)
    if not _may_write(filepath, overwrite):
        return None
    if flavour == "tf_keras":
        return model.save_weights(filepath, overwrite=True, **kwargs)
    import keras

    path = _local_path(filepath)
    if path is None or not path.endswith(".weights.h5") or kwargs:
        return keras.saving.save_weights(model, filepath, overwrite=True, **kwargs)
    with _no_gc_pauses():
        weights_file.save(model, path, threads=threads)
    return None


def load_weights(model, filepath, skip_mismatch=False, **kwargs):
    """Loads weights saved by `save_weights`/`save_model` (ours or stock's) into a built model.

    Keras 3: `.keras` and `.weights.h5` files are read by the fast path; legacy `.h5`, sharded
    `.weights.json` and stock's keyword arguments go to stock. tf_keras: stock `model.load_weights`.
    """
    threads = _threads(kwargs.pop("threads", None))
    flavour = _flavour(model)
    if flavour == "tf_keras":
        return model.load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)
    import keras

    path = _local_path(filepath)
    if path is None or kwargs or not path.endswith((".keras", ".weights.h5")):
        return keras.saving.load_weights(model, filepath, skip_mismatch=skip_mismatch, **kwargs)
    with _no_gc_pauses():
        weights_file.load(model, path, skip_mismatch=skip_mismatch, threads=threads)
    return None
