"""The public API, with stock's signatures: dispatch on the Keras flavour and the file format.

Accelerated: Keras 3 models to and from local `.keras` zips and `.weights.h5` files. Everything
else goes to the stock implementation of the model's flavour, with stock behaviour.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
import warnings

from . import asynchronous, mapped, progress
from ._core import MAX_THREADS
from .asynchronous import write_now
from .files import MODEL_FILE_SUFFIXES, durability, refuse_stock_write_if_mapped, sync
from .formats import legacy_h5, sharded_weights, tensor_bundle, weights_h5
from .keras3 import hooks as keras3_hooks
from .overwrite import ask_to_replace, prompt_refusals
from .stock import KERAS3_SAVING_API, TF_KERAS_SAVING_API, stock
from .tensors import ALIGNMENT

_LEGACY_KERAS_VALUES = ("true", "True", "1")  # tensorflow/python/util/lazy_loader.py


def legacy_keras_requested() -> bool:
    """Whether `tf.keras` is tf_keras (Keras 2) here: TensorFlow's own rule, `TF_USE_LEGACY_KERAS`."""
    return os.environ.get("TF_USE_LEGACY_KERAS", None) in _LEGACY_KERAS_VALUES


class NotAKerasModelError(TypeError, AttributeError):
    """`model` is not a Keras model. Also an AttributeError: stock's saving functions raise that
    for it (they reach for an attribute of the model first), and code written for stock catches it."""


def _flavour(model) -> str:
    """'keras3' or 'tf_keras', from the model's class."""
    import keras

    if isinstance(model, keras.Model):
        return "keras3"
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is not None and isinstance(model, tf_keras.Model):
        return "tf_keras"
    raise NotAKerasModelError(
        "`model` must be a Keras model (a `keras.Model` or a `tf_keras.Model`). "
        f"Received: model={model!r} of type {type(model)}"
    )


def _positional(function: str, names: tuple[str, ...], args: tuple, kwargs: dict) -> None:
    """Moves positional arguments past stock's first three into `kwargs`, under the flavour's names."""
    if len(args) > len(names):
        raise TypeError(f"{function}() takes at most {3 + len(names)} positional arguments ({3 + len(args)} given)")
    for name, value in zip(names, args, strict=False):
        if name in kwargs:
            raise TypeError(f"{function}() got multiple values for argument '{name}'")
        kwargs[name] = value


def _local_path(filepath, flavour: str) -> str | None:
    """`filepath` as a local path string, or None for file objects and for what the flavour's stock
    code treats as remote (`gs://`, `hf://`, `/gcs/...`): those go to stock."""
    if not isinstance(filepath, str | os.PathLike):
        return None
    path = os.fspath(filepath)
    if not isinstance(path, str):
        return None
    if flavour == "keras3" and not keras3_hooks.usable():
        return None  # this Keras lacks a piece the fast paths use: stock does it all
    if flavour == "tf_keras":
        from tf_keras.src.saving.saving_lib import is_remote_path
    else:
        from keras.src.utils.file_utils import is_remote_path
    return None if is_remote_path(path) else path


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_forks = 0  # in a child forked during pauses: how many times (the ends of those pauses are not counted)
_gc_thresholds = gc.get_threshold()  # the application's, while a save or load pauses collections


def _paused(thresholds: tuple[int, ...]) -> tuple[int, ...]:
    return (0, *thresholds[1:])  # a first threshold of 0 stops automatic collections


@contextlib.contextmanager
def _no_gc_pauses():
    """Keeps Python's cyclic GC from pausing inside a save or load (a full collection of a process
    holding TensorFlow and a big model can cost more than a ResNet50 load). It zeroes the first
    collection threshold rather than calling `gc.disable()`, so an application that disables or
    enables the GC meanwhile (on another thread) keeps its choice. Saves and loads running at once
    on several threads are counted: the last one out puts the thresholds back, unless the
    application set others meanwhile."""
    global _gc_pausers, _gc_thresholds
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_thresholds = gc.get_threshold()
            gc.set_threshold(*_paused(_gc_thresholds))
        _gc_pausers += 1
        forks = _gc_forks
    try:
        yield
    finally:
        with _gc_lock:
            if forks == _gc_forks:  # else a child forked inside: its count began at 0 without this pause
                _gc_pausers -= 1
                if _gc_pausers == 0:
                    _unpause()


def _unpause() -> None:
    """Collections back at the application's thresholds, unless it set others meanwhile."""
    if gc.get_threshold() == _paused(_gc_thresholds):
        gc.set_threshold(*_gc_thresholds)


def _gc_in_child() -> None:
    """A child forked while a save or load ran has none running: collections back as they were, the count reset."""
    global _gc_lock, _gc_pausers, _gc_forks
    _gc_lock = threading.Lock()  # it may have been held by a thread the child does not have
    if _gc_pausers:
        _gc_pausers = 0
        _gc_forks += 1
        _unpause()


os.register_at_fork(after_in_child=_gc_in_child)


@contextlib.contextmanager
def _naming(path: str):
    """Errors out of a load keep stock's type and message (HDF5's own rarely name the file) and
    gain a note naming the file."""
    try:
        yield
    except Exception as e:
        if path not in str(e):
            e.add_note(f"(while loading {path!r} with kerassave_fast)")
        raise


def _threads(value) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_THREADS:
        raise ValueError(
            f"`threads` must be a positive integer up to {MAX_THREADS}, or None. Received: threads={value!r}"
        )
    return value


def _blocking(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`blocking` must be True or False. Received: blocking={value!r}")
    return value


def _fsync(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`fsync` must be True or False. Received: fsync={value!r}")
    return value


def _may_write(filepath, overwrite: bool) -> bool:
    """Keras 3's overwrite rule for the files we write: an existing file is replaced only when
    `overwrite` is true or the user says so at stock's prompt."""
    try:
        exists = os.path.exists(filepath)
    except TypeError:
        exists = False
    return not exists or overwrite or ask_to_replace(filepath, "keras3")


@contextlib.contextmanager
def _handed_to_stock(filepath, rewritten: list[str] | tuple = ()):
    """Around a save handed to stock, whose writers rewrite their file in place (and the files
    `rewritten`): refused while a model loaded from one with mmap=True reads its pages; stock's
    overwrite prompts as ours."""
    for path in (filepath, *rewritten):
        refuse_stock_write_if_mapped(path)
    with prompt_refusals(filepath):
        yield


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


def save_model(model, filepath, overwrite=True, *args, save_format=None, **kwargs):
    """Saves a model (architecture, weights, optimizer state) as stock Keras does, faster.

    Args:
        model: a Keras 3 `keras.Model` or a tf_keras `tf_keras.Model`; the flavour picks the
            stock behaviour to follow.
        filepath: `str` or `pathlib.Path`. `.keras` (Keras v3 zip), `.h5` (legacy HDF5), or for
            tf_keras a SavedModel directory.
        overwrite: whether to replace an existing file. If False, ask (stock's prompt); when no
            answer can come, raise `OverwriteRefused` (a `FileExistsError` and an `EOFError`).
        *args: the flavour's own fourth argument: `zipped` for Keras 3, `save_format` for tf_keras.
        save_format: as in stock (`"keras"`, `"h5"`, `"tf"` for tf_keras; deprecated in Keras 3).
        **kwargs: stock's `include_optimizer`, `signatures`, `options`, `save_traces` (tf_keras
            SavedModel), `zipped` (Keras 3), plus our own `threads` (I/O threads, default one
            per core), `fsync` (default False, as stock: when True, the saved files and then the
            directory entries naming them are fsynced before the call returns, so the save
            survives a power loss), and for `.keras`, `.h5` and `.weights.h5` files `compression`
            (None, "gzip" or "zstd"; chunked datasets with shuffle, compressed on all cores;
            stock h5py reads gzip as it is and zstd with `hdf5plugin`), `compression_level`
            (gzip 0-9, default 4; zstd 1-22, default 3), `chunk_bytes` (about 1 MiB by default)
            and `checksum` (HDF5's Fletcher-32 filter per chunk, checked by every reader), and
            `aligned` (default False: when True, every tensor at a 64-byte boundary of the file, for
            `load_model(..., mmap=True)`; stock reads the file, a few KB larger); for a
            tf_keras SavedModel, `max_shard_size` (GB, as Keras 3's `save_weights` takes it):
            `variables/` in data shards of at most that size, written side by side (a larger
            tensor gets a shard of its own), which TensorFlow reads as any sharded checkpoint.
            `progress` (as `load_model`'s; a background save shows none unless True);
            `blocking` (default True): when False, the variables are snapshotted (zero-copy) and
            the call returns a `SaveHandle` while the file is written in the background, so
            training can go on; `.keras` and `.h5` files and Keras 3 `.weights.h5` files are
            written so. Other saves are complete when the call returns, their handle already
            done. Any later kerassave_fast save or load first waits for the one in flight.

    The `.keras` file is byte-layout-compatible with stock's: it loads in stock Keras, and a save
    that fails leaves any previous file untouched.
    """

    def save(threads, compression, alignment, write):
        return _save_model(
            model, filepath, overwrite, threads, args, save_format, kwargs, compression, alignment, write
        )

    return _saving(save, model, filepath, kwargs)


def _saving(save, model, filepath, kwargs: dict):
    """Runs `save(threads, compression, alignment, write)` with our own keywords taken out of `kwargs`:
    durably if `fsync`, and with `blocking=False` its file write deferred to the background
    (then returns a `SaveHandle`)."""
    threads = _threads(kwargs.pop("threads", None))
    fsync = _fsync(kwargs.pop("fsync", False))
    blocking = _blocking(kwargs.pop("blocking", True))
    show = progress.wanted(kwargs.pop("progress", None if blocking else False))
    compression = _compression(kwargs)
    alignment = ALIGNMENT if _aligned(kwargs.pop("aligned", False)) else 1
    asynchronous.wait_for_previous()
    deferred = asynchronous.Deferred()
    total = progress.model_bytes(model) if show else 0
    description = _labelled("saving", filepath)

    def defer(write):
        deferred.defer(progress.around(write, total, description) if show else write)

    with durability(fsync) as durable, progress.bar(total, description, show and blocking):
        result = save(threads, compression, alignment, write_now if blocking else defer)
        if not deferred.pending:  # else the deferred write syncs what it writes
            _sync_what_stock_wrote(durable, filepath, model)
        if not blocking:
            return deferred.start(filepath, result)
    return result


def _sync_what_stock_wrote(durable, filepath, model) -> None:
    """A durable save that went to stock: fsync what stock wrote (our own writers synced theirs)."""
    if durable is not None and not durable.synced and (path := _local_path(filepath, _flavour(model))) is not None:
        sync(path)


def _compression(kwargs: dict) -> weights_h5.Compression | None:
    """Our compression keywords, taken out of `kwargs` and checked."""
    names = ("compression", "compression_level", "chunk_bytes", "checksum")
    given = {name: kwargs.pop(name) for name in names if name in kwargs}
    return weights_h5.Compression.from_arguments(**given)


def _aligned(aligned) -> bool:
    if not isinstance(aligned, bool):
        raise TypeError(f"`aligned` must be True or False. Received: aligned={aligned!r}")
    return aligned


def _no_compression_here(compression: weights_h5.Compression | None, filepath, alignment: int = 1) -> None:
    if alignment > 1:
        raise ValueError(
            f"`aligned` applies to local `.keras`, `.h5` and `.weights.h5` files, not to {filepath!r} "
            "(or these arguments)"
        )
    if compression is not None:
        raise ValueError(
            "`compression`, `chunk_bytes` and `checksum` apply to local `.keras`, `.h5` and `.weights.h5` "
            f"files, not to {filepath!r} (or these arguments)"
        )


def _no_sharding_here(max_shard_bytes: int | None, filepath) -> None:
    if max_shard_bytes is not None:
        raise ValueError(
            "`max_shard_size` applies to local TensorFlow SavedModels and TF-format weights (tensor bundles) "
            f"that kerassave_fast writes, not to {filepath!r} (or these arguments)"
        )


def _warn_if_unbuilt(model) -> None:
    """Both flavours' `.keras` savers warn so (stacklevel: the user's call of `save_model`)."""
    if not model.built:
        warnings.warn(
            "You are saving a model that has not yet been built. It might not contain any weights yet. "
            "Consider building the model first by calling it on some data.",
            stacklevel=6,
        )


def _save_model(
    model, filepath, overwrite, threads, args, save_format, kwargs, compression=None, alignment=1, write=write_now
):
    flavour = _flavour(model)
    if flavour == "tf_keras":
        given = {} if save_format is None else {"save_format": save_format}
        _positional("save_model", ("save_format",), args, given)
        save_format = given.get("save_format")
        from .tf_keras import keras_v3
        from .tf_keras import legacy_h5 as tf_legacy_h5
        from .tf_keras import saved_model as tf_saved_model

        path = _local_path(filepath, "tf_keras")
        max_shard_bytes = tensor_bundle.max_shard_bytes(kwargs.pop("max_shard_size", None))
        if compression is None and alignment == 1 and tf_saved_model.can_save_fast(model, path, save_format, kwargs):
            with _no_gc_pauses():
                return tf_saved_model.save(
                    model, path, overwrite, **kwargs, threads=threads, max_shard_bytes=max_shard_bytes
                )
        _no_sharding_here(max_shard_bytes, filepath)
        if keras_v3.can_save_fast(path, save_format, kwargs):
            if overwrite or not os.path.exists(path) or ask_to_replace(path, "tf_keras"):
                from .formats import keras_zip

                _warn_if_unbuilt(model)
                with _no_gc_pauses():
                    write(
                        keras_zip.prepare_save(
                            model,
                            path,
                            True,
                            threads,
                            compression=compression,
                            alignment=alignment,
                            flavour=keras_v3,
                            blocking=write is write_now,
                        )
                    )
            return None
        if tf_legacy_h5.can_save_model_fast(model, path, save_format, kwargs):
            warnings.warn(tf_legacy_h5.H5_SAVE_WARNING, stacklevel=5)
            if overwrite or not os.path.isfile(path) or ask_to_replace(path, "tf_keras"):
                with _no_gc_pauses():
                    contents = tf_legacy_h5.model_contents(model, kwargs.get("include_optimizer", True))
                    write(legacy_h5.prepare_save(contents, path, threads, compression, alignment))
            return None
        _no_compression_here(compression, filepath, alignment)
        with _handed_to_stock(filepath):
            return stock(TF_KERAS_SAVING_API, "save_model")(
                model, filepath, overwrite=overwrite, save_format=save_format, **kwargs
            )

    _positional("save_model", ("zipped",), args, kwargs)
    path = _local_path(filepath, "keras3")
    include_optimizer = kwargs.get("include_optimizer", True)
    fast = (
        path is not None
        and path.endswith(MODEL_FILE_SUFFIXES)
        and kwargs.get("zipped", True) in (None, True)
        and not save_format
        and set(kwargs) <= {"include_optimizer", "zipped"}
    )
    if not fast:
        _no_compression_here(compression, filepath, alignment)
        if save_format:
            kwargs["save_format"] = save_format
        with _compile_config_kept(model), _handed_to_stock(filepath):
            return stock(KERAS3_SAVING_API, "save_model")(model, filepath, overwrite, **kwargs)
    if not path.endswith(".keras"):
        from absl import logging

        from .keras3 import legacy_h5 as keras3_legacy_h5

        logging.warning(keras3_legacy_h5.H5_SAVE_WARNING)
        if _may_write(filepath, overwrite):
            with _no_gc_pauses(), _compile_config_kept(model):
                contents = keras3_legacy_h5.model_contents(model, include_optimizer)
                write(legacy_h5.prepare_save(contents, path, threads, compression, alignment))
        return None
    if not _may_write(filepath, overwrite):
        return None
    _warn_if_unbuilt(model)
    from .formats import keras_zip

    with _no_gc_pauses():
        write(
            keras_zip.prepare_save(
                model,
                path,
                include_optimizer,
                threads,
                compression=compression,
                alignment=alignment,
                blocking=write is write_now,
            )
        )
    return None


def load_model(filepath, custom_objects=None, compile=True, safe_mode=True, **kwargs):
    """Loads a model saved by `save_model` or by stock Keras.

    Args:
        filepath: `str` or `pathlib.Path` of a `.keras` zip, a legacy `.h5` file or (tf_keras) a
            SavedModel directory.
        custom_objects: mapping of names to custom classes or functions used in the model.
        compile: whether to compile the model after loading, as it was when saved.
        safe_mode: refuse `lambda` deserialization (Keras v3 format), as stock does.
        **kwargs: our own `threads` (I/O threads, default one per core), `progress` (a
            progress bar in bytes on stderr for a load past a second: True, False, or None, the
            default, for one when stderr is a terminal and `CI` is not set), `mmap` (default False;
            for `.keras` and `.h5` files: variables adopt the pages of a private, copy-on-write map of
            the file instead of a copy, for every tensor saved at an aligned offset -- files saved
            with `aligned=True`; other tensors are read as usual) and `verify` (a mapped `.keras`
            load's CRC-32 check: "background", the default, checks after returning and reports through
            `kerassave_fast.verification(model)`; True checks before, reading the whole file; False
            never); for tf_keras, stock's `options`.

    The flavour follows TensorFlow's rule for `tf.keras`: tf_keras when `TF_USE_LEGACY_KERAS` is
    `1`/`true`, else Keras 3.
    """
    flavour = "tf_keras" if legacy_keras_requested() else "keras3"
    return load_model_as(flavour, filepath, custom_objects, compile, safe_mode, **kwargs)


def load_model_as(flavour: str, filepath, custom_objects=None, compile=True, safe_mode=True, **kwargs):
    """`load_model` into the given flavour ("keras3" or "tf_keras"), as that flavour's own
    `load_model` would: what `tf_keras.models.load_model` routed through us must do."""
    if flavour not in ("keras3", "tf_keras"):
        raise ValueError(f"`flavour` must be 'keras3' or 'tf_keras'. Received: flavour={flavour!r}")
    threads = _threads(kwargs.pop("threads", None))
    show = progress.wanted(kwargs.pop("progress", None))
    reading = _Reading(threads, kwargs)
    asynchronous.wait_for_previous()
    with progress.bar(progress.path_bytes(filepath) if show else 0, _labelled("loading", filepath), show):
        return _load_model_as(flavour, filepath, custom_objects, compile, safe_mode, reading, kwargs)


class _Reading:
    """How a load reads tensors: `threads`, and whether from a private map of the file (`mmap`,
    `verify`; see mapped.py), taken out of the keyword arguments."""

    def __init__(self, threads: int, kwargs: dict):
        self.threads = threads
        self.mmap = kwargs.pop("mmap", False)
        self.verify = mapped.verify_choice(self.mmap, kwargs.pop("verify", None))

    def not_here(self, filepath) -> None:
        """Refuses `mmap=True` for a load that does not read the file itself (stock's, TensorFlow's)."""
        if self.mmap:
            raise ValueError(
                f"`mmap=True` applies to local `.keras`, `.h5` and `.weights.h5` files, not to {filepath!r}"
            )


def _labelled(doing: str, filepath) -> str:
    """A progress bar's description: what is done to which file (a file object's is not named)."""
    return f"{doing} {os.path.basename(os.fspath(filepath))}" if isinstance(filepath, str | os.PathLike) else doing


def _load_model_as(flavour, filepath, custom_objects, compile, safe_mode, reading: _Reading, kwargs):
    threads = reading.threads
    if flavour == "tf_keras":
        from .tf_keras import keras_v3
        from .tf_keras import legacy_h5 as tf_legacy_h5

        path = _local_path(filepath, "tf_keras")
        if keras_v3.can_load_fast(path, kwargs):
            from .formats import keras_zip

            with _no_gc_pauses(), _naming(path):
                return keras_zip.load(
                    path, custom_objects, compile, safe_mode, threads, keras_v3, reading.mmap, reading.verify
                )
        if tf_legacy_h5.can_load_model_fast(path, kwargs):
            with _no_gc_pauses(), _naming(path), weights_h5.read_ahead(path, threads, reading.mmap) as opened:
                return tf_legacy_h5.load_model(opened, custom_objects, compile)
        reading.not_here(filepath)
        from .tf_keras import saved_model as tf_saved_model

        stock_load_model = stock(TF_KERAS_SAVING_API, "load_model")
        if tf_saved_model.can_load_fast(path, kwargs):
            with _no_gc_pauses(), _naming(path):
                return tf_saved_model.load(
                    stock_load_model,
                    path,
                    threads,
                    custom_objects=custom_objects,
                    compile=compile,
                    safe_mode=safe_mode,
                    **kwargs,
                )
        with _naming(path) if path is not None else contextlib.nullcontext():
            return stock_load_model(
                filepath, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode, **kwargs
            )
    for name in kwargs:  # Keras 3's load_model has no **kwargs
        raise TypeError(f"load_model() got an unexpected keyword argument '{name}'")
    path = _local_path(filepath, "keras3")
    if path is not None and path.endswith((".h5", ".hdf5")) and not os.path.isdir(path):
        from .keras3 import legacy_h5 as keras3_legacy_h5

        with _no_gc_pauses(), _naming(path), weights_h5.read_ahead(path, threads, reading.mmap) as opened:
            return keras3_legacy_h5.load_model(opened, path, custom_objects, compile, safe_mode)
    if path is None or not path.endswith(".keras") or os.path.isdir(path):
        reading.not_here(filepath)
        return stock(KERAS3_SAVING_API, "load_model")(filepath, custom_objects, compile, safe_mode)
    if not os.path.exists(path):
        raise ValueError(
            f"File not found: filepath={filepath}. Please ensure the file is an accessible `.keras` zip file."
        )
    from .formats import keras_zip

    with _no_gc_pauses():
        return keras_zip.load(
            path, custom_objects, compile, safe_mode, threads, mmap=reading.mmap, verify=reading.verify
        )


def export_saved_model(model, filepath, **kwargs):
    """Exports the inference SavedModel `model.export(filepath, **kwargs)` writes -- Keras 3's
    `format="tf_saved_model"` (its default), tf_keras' `export` -- with the variables written by the
    Rust core while TensorFlow traces. Keyword arguments are `export`'s, plus our own `threads`.
    Remote paths and other formats go to `model.export` unchanged."""
    threads = _threads(kwargs.pop("threads", None))
    max_shard_bytes = tensor_bundle.max_shard_bytes(kwargs.pop("max_shard_size", None))
    _no_compression_here(_compression(kwargs), filepath)  # (`export` would take and drop them)
    path = _local_path(filepath, _flavour(model))
    asynchronous.wait_for_previous()
    if path is None or kwargs.get("format", "tf_saved_model") != "tf_saved_model":
        _no_sharding_here(max_shard_bytes, filepath)
        return model.export(filepath, **kwargs)
    from .export import export_saved_model as export

    with _no_gc_pauses():
        export(model, path, threads, max_shard_bytes, **kwargs)
    return None


def save_weights(model, filepath, overwrite=True, *args, **kwargs):
    """Saves only the weights (and optimizer state) of a model, as `model.save_weights` does.

    The fourth positional argument is the flavour's own: `max_shard_size` for Keras 3 (as
    `keras.saving.save_weights`), `save_format` then `options` for tf_keras (as `Model.save_weights`).
    Keras 3: `.weights.h5` files, and sharded `.weights.json` ones (`max_shard_size`, GB), are
    written by the fast path (same files as stock's). tf_keras: TF-format weights (a tensor bundle) and `.h5` by
    the fast path. Our own keywords: `threads`, `fsync`, `compression`, `compression_level`,
    `chunk_bytes`, `checksum`, `aligned`, `blocking`, `progress` (as in `save_model`), and for tf_keras
    TF-format weights `max_shard_size` (GB; data shards of at most that size, as for a SavedModel).
    """

    def save(threads, compression, alignment, write):
        return _save_weights(model, filepath, overwrite, threads, args, kwargs, compression, alignment, write)

    return _saving(save, model, filepath, kwargs)


def _save_weights(model, filepath, overwrite, threads, args, kwargs, compression=None, alignment=1, write=write_now):
    flavour = _flavour(model)
    if flavour == "tf_keras":
        _positional("save_weights", ("save_format", "options"), args, kwargs)
        from .tf_keras import checkpoint as tf_checkpoint
        from .tf_keras import legacy_h5 as tf_legacy_h5

        path = _local_path(filepath, "tf_keras")
        max_shard_bytes = tensor_bundle.max_shard_bytes(kwargs.pop("max_shard_size", None))
        if (
            compression is None
            and alignment == 1
            and set(kwargs) <= {"save_format", "options"}
            and tf_checkpoint.can_save_fast(model, path, kwargs.get("save_format"), kwargs.get("options"))
        ):
            with _no_gc_pauses():
                if tf_checkpoint.save_weights(model, path, overwrite, threads, max_shard_bytes):
                    return None
            overwrite = True  # stock's question, if any, was asked and answered yes
        _no_sharding_here(max_shard_bytes, filepath)
        if set(kwargs) <= {"save_format", "options"} and tf_legacy_h5.can_save_weights_fast(
            path, kwargs.get("save_format")
        ):
            model._assert_weights_created()
            if overwrite or not os.path.isfile(path) or ask_to_replace(path, "tf_keras"):
                with _no_gc_pauses():
                    contents = tf_legacy_h5.weights_file_contents(model)
                    write(legacy_h5.prepare_save(contents, path, threads, compression, alignment))
            return None
        _no_compression_here(compression, filepath, alignment)
        with _handed_to_stock(filepath):
            return stock(TF_KERAS_SAVING_API, "save_weights")(model, filepath, overwrite=overwrite, **kwargs)
    _positional("save_weights", ("max_shard_size",), args, kwargs)
    max_shard_size = kwargs.pop("max_shard_size", None)
    path = _local_path(filepath, "keras3")
    ours = ".weights.h5" if max_shard_size is None else ".weights.json"  # else stock's error or renaming
    if path is None or not path.endswith(ours) or kwargs:
        _no_compression_here(compression, filepath, alignment)
        shards = ()
        if max_shard_size is not None:
            kwargs["max_shard_size"] = max_shard_size
            if path is not None and path.endswith((".weights.h5", ".weights.json")):  # else stock's error
                shards = sharded_weights.shards_there(path)
        with _handed_to_stock(filepath, shards):
            return stock(KERAS3_SAVING_API, "save_weights")(model, filepath, overwrite, **kwargs)
    if not _may_write(filepath, overwrite):
        return None
    from .formats import weights_file

    with _no_gc_pauses():
        if max_shard_size is None:
            write(weights_file.prepare_save(model, path, threads, compression, alignment, blocking=write is write_now))
        else:
            write(weights_file.prepare_sharded_save(model, path, max_shard_size, threads, compression, alignment))
    return None


def load_weights(model, filepath, skip_mismatch=False, **kwargs):
    """Loads weights saved by `save_weights`/`save_model` (ours or stock's) into a built model.

    Keras 3: `.keras`, `.weights.h5`, sharded `.weights.json` and legacy `.h5` files are read by
    the fast path; stock's keyword arguments (`by_name`, `objects_to_skip`) go to stock.
    Our own keywords: `threads`, `progress`, `mmap` and `verify` (as in `load_model`).
    tf_keras: legacy `.h5` files (topological) and TF-format weights by the fast path; `by_name`,
    `skip_mismatch`, tf_keras' `.weights.h5` and `.keras` go to stock.
    """
    threads = _threads(kwargs.pop("threads", None))
    show = progress.wanted(kwargs.pop("progress", None))
    reading = _Reading(threads, kwargs)
    flavour = _flavour(model)
    asynchronous.wait_for_previous()
    # Skipping mismatches, loading by name or skipping objects: some variables may keep their bytes.
    partial = skip_mismatch or any(bool(value) for value in kwargs.values())
    earlier_check = mapped.verification(model)
    with progress.bar(progress.path_bytes(filepath) if show else 0, _labelled("loading", filepath), show):
        loaded = _load_weights(model, flavour, filepath, skip_mismatch, reading, kwargs)
    if earlier_check is not None and not partial:  # every weight replaced: the check no longer speaks for them
        mapped.forget_verification(model, earlier_check)
    elif earlier_check is not None:  # some weights kept: the check still speaks for them, beside any newer one
        mapped.keep_verification(model, earlier_check)
    return loaded


def _load_weights(model, flavour, filepath, skip_mismatch, reading: _Reading, kwargs):
    threads = reading.threads
    if flavour == "tf_keras":
        from .tf_keras import checkpoint as tf_checkpoint
        from .tf_keras import legacy_h5 as tf_legacy_h5

        path = _local_path(filepath, "tf_keras")
        if tf_legacy_h5.can_load_weights_fast(model, path, kwargs, skip_mismatch):
            tf_legacy_h5.check_weights_loadable(model)
            with _no_gc_pauses(), _naming(path), weights_h5.read_ahead(path, threads, reading.mmap) as opened:
                return tf_legacy_h5.load_weights(opened, model)
        reading.not_here(filepath)
        if set(kwargs) <= {"by_name", "options"} and tf_checkpoint.can_load_fast(
            model, path, kwargs.get("by_name", False), skip_mismatch, kwargs.get("options")
        ):
            with _no_gc_pauses(), _naming(path), contextlib.suppress(tf_checkpoint.NotFast):
                return tf_checkpoint.load_weights(model, path, threads)
        return stock(TF_KERAS_SAVING_API, "load_weights")(model, filepath, skip_mismatch=skip_mismatch, **kwargs)
    path = _local_path(filepath, "keras3")
    declined_map = False  # a sharded map ours leaves to stock: its error, or its (copying) load, mmap or not
    if path is not None and not kwargs and path.endswith((".keras", ".weights.h5", ".weights.json")):
        from .formats import weights_file

        with _no_gc_pauses(), _naming(path):
            if weights_file.load(model, path, skip_mismatch, threads, reading.mmap, reading.verify):
                return None
        declined_map = path.endswith(".weights.json")
    elif path is not None and not kwargs and path.endswith((".h5", ".hdf5")) and os.path.isfile(path):
        from .keras3 import legacy_h5 as keras3_legacy_h5

        with _no_gc_pauses(), _naming(path), weights_h5.read_ahead(path, threads, reading.mmap) as opened:
            return keras3_legacy_h5.load_weights(opened, model, skip_mismatch)
    if not declined_map:
        reading.not_here(filepath)
    return stock(KERAS3_SAVING_API, "load_weights")(model, filepath, skip_mismatch=skip_mismatch, **kwargs)
