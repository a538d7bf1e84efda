"""tf_keras SavedModels (`save_model(model, dir, save_format="tf")`): TensorFlow writes the graph,
the Rust core writes `variables/`.

The steps are stock's -- tf_keras' legacy `save_model` and `saved_model/save.py` `save`, around
TensorFlow's `save_and_return_nodes` -- run with the same internals, except for the variables:
instead of `object_saver.save`, the tensors `TrackableSaver` would hand `SaveV2` are written by the
Rust bundle writer (tf_keras/checkpoint.py). Their bytes do not wait for the graph: before
TensorFlow traces, the tensors of the model's own checkpoint (which come first in the SavedModel's
checkpoint, in the same order) start being written on a background thread while TensorFlow traces
(the GIL is released while the bytes move). After tracing, the SavedModel's real list of tensors is
compared with what was written -- same keys, same variables, same buffers -- the rest (tf_keras'
`keras_api` metrics, the object graph of the SavedModel) is appended, and the index written; if
anything differs, the data file is rewritten from the real list. The bundle is complete before
`fingerprint.pb` is computed, which hashes it.

The directory is written beside the target and moved into place only when complete (an existing
SavedModel directory is swapped for it atomically with `renameat2(RENAME_EXCHANGE)` where the file
system has it, then deleted); a directory holding anything but SavedModel files is written in
place, as stock does.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import shutil
import threading
import warnings
from collections.abc import Iterator

import numpy as np

from ..files import staging_directory, sync, sync_name
from ..formats import tensor_bundle
from ..formats.tensor_bundle import DT_STRING, BundleReader, BundleTensor
from ..overwrite import ask_to_replace
from .checkpoint import (
    NotFast,
    checkpoint_tensors,
    restore,
    restore_dependency,
    restore_with_saver,
    tf_internals_supported,
)

SAVE_KWARGS = frozenset({"include_optimizer", "signatures", "options", "save_traces"})
# What a SavedModel directory holds (tensorflow/python/saved_model/constants.py, keras_metadata.pb):
# a directory with only these may be replaced as a whole.
SAVED_MODEL_ENTRIES = frozenset(
    {
        "saved_model.pb",
        "saved_model.pbtxt",
        "saved_model.cpb",
        "fingerprint.pb",
        "keras_metadata.pb",
        "variables",
        "assets",
        "assets.extra",
        "debug",
    }
)


def can_save_fast(model, path: str | None, save_format, kwargs: dict) -> bool:
    """Whether `save_model(model, path, save_format=save_format, **kwargs)` is a SavedModel save
    this module does as stock does it."""
    import tensorflow as tf
    from tf_keras.src.saving import saving_api
    from tf_keras.src.saving.legacy import saving_utils

    if path is None or not set(kwargs) <= SAVE_KWARGS:
        return False
    try:
        if saving_api.get_save_format(path, save_format) != "tf" or saving_utils.is_hdf5_filepath(path):
            return False
    except ValueError:  # stock's error for an unknown format
        return False
    options = kwargs.get("options")
    if options is not None and (
        options.experimental_io_device  # the checkpoint is then written by other devices,
        or options.experimental_sharding_callback  # or in other shards,
        or options.experimental_image_format  # or the graph by a splitter TensorFlow's OSS build lacks
    ):
        return False
    return tf.executing_eagerly() and tf_internals_supported() and _tf_save_internals() is not None


def _tf_save_internals():
    """TensorFlow's saved_model/save.py, if it has what `save_and_return_nodes` uses."""
    from tensorflow.python.saved_model import save as save_lib

    needed = (
        "_build_meta_graph",
        "path_helpers",
        "builder_impl",
        "pywrap_saved_model",
        "fingerprinting_utils",
        "file_io",
        "compat",
        "constants",
        "metrics",
        "_export_debug_info",
    )
    missing = [name for name in needed if not hasattr(save_lib, name)]
    if missing:
        if not _warned_internals.is_set():
            _warned_internals.set()
            warnings.warn(
                f"kerassave_fast: this TensorFlow's saved_model/save.py lacks {', '.join(missing)}; tf_keras "
                "SavedModels are saved by stock TensorFlow.",
                stacklevel=4,
            )
        return None
    return save_lib


_warned_internals = threading.Event()


def save(
    model,
    filepath: str,
    overwrite: bool = True,
    include_optimizer: bool = True,
    signatures=None,
    options=None,
    save_traces: bool = True,
    threads: int = 0,
) -> None:
    """tf_keras' legacy `save_model` for the SavedModel format (saving/legacy/save.py)."""
    from tf_keras.src.saving.legacy import saving_utils, serialization
    from tf_keras.src.saving.legacy.saved_model.utils import keras_option_scope

    saving_utils.try_build_compiled_arguments(model)
    with (
        serialization.SharedObjectSavingScope(),
        keras_option_scope(save_traces=save_traces, in_tf_saved_model_scope=True),
    ):
        _keras_saved_model_save(
            model, filepath, overwrite, include_optimizer, signatures, options, save_traces, threads
        )


def _keras_saved_model_save(model, filepath, overwrite, include_optimizer, signatures, options, save_traces, threads):
    """tf_keras/src/saving/legacy/saved_model/save.py `save`, into a directory moved into place at the end."""
    import tensorflow as tf
    from tf_keras.src import backend
    from tf_keras.src.saving.legacy import saving_utils, serialization
    from tf_keras.src.saving.legacy.saved_model import constants, save_impl, utils
    from tf_keras.src.saving.legacy.saved_model import save as keras_save

    if not overwrite and os.path.exists(filepath) and not ask_to_replace(filepath, "tf_keras"):
        return
    if save_traces and save_impl.should_skip_serialization(model):
        saving_utils.raise_model_input_error(model)
    if not include_optimizer:
        orig_optimizer = model.optimizer
        model.optimizer = None
        model._delete_tracking("optimizer")
    try:
        with _staged_directory(filepath) as export_dir:
            with serialization.SharedObjectSavingScope():
                with backend.deprecated_internal_learning_phase_scope(0):
                    with utils.keras_option_scope(save_traces):
                        saved_nodes, node_paths = save_and_return_nodes(model, export_dir, signatures, options, threads)
                    metadata = keras_save.generate_keras_metadata(saved_nodes, node_paths)
            with tf.io.gfile.GFile(tf.io.gfile.join(export_dir, constants.SAVED_METADATA_PATH), "wb") as w:
                w.write(metadata.SerializeToString(deterministic=True))
    finally:
        if not include_optimizer:
            model.optimizer = orig_optimizer


def save_and_return_nodes(obj, export_dir: str, signatures=None, options=None, threads: int = 0):
    """TensorFlow's `save_and_return_nodes` (saved_model/save.py), its checkpoint written by the Rust
    core, overlapped with the tracing."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.checkpoint import checkpoint_options
    from tensorflow.python.eager import context
    from tensorflow.python.framework import errors, ops
    from tensorflow.python.saved_model import save_options

    save_lib = _tf_save_internals()
    options = options or save_options.SaveOptions()
    saved_model = saved_model_pb2.SavedModel()
    meta_graph_def = saved_model.meta_graphs.add()
    save_lib.path_helpers.get_or_create_variables_dir(export_dir)
    prefix = save_lib.path_helpers.get_variables_path(export_dir)
    try:
        with tensor_bundle.writing(prefix) as writer, _EarlyWrite(writer, obj, threads) as early:
            _, exported_graph, object_saver, asset_info, saved_nodes, node_paths = save_lib._build_meta_graph(
                obj, signatures, options, meta_graph_def
            )
            early.finish(checkpoint_tensors(object_saver))
    except NotFast:  # stock's own checkpoint writer, as stock calls it
        ckpt_options = checkpoint_options.CheckpointOptions(
            experimental_io_device=options.experimental_io_device,
            experimental_sharding_callback=options.experimental_sharding_callback,
        )
        object_saver.save(prefix, options=ckpt_options)
    saved_model.saved_model_schema_version = save_lib.constants.SAVED_MODEL_SCHEMA_VERSION
    save_lib.builder_impl.copy_assets_to_destination_dir(asset_info.asset_filename_map, export_dir)
    if context.executing_eagerly():
        try:
            context.async_wait()
        except errors.NotFoundError as err:
            raise FileNotFoundError(
                f"{err}\n You may be trying to save on a different device from the "
                "computational device. Consider setting the "
                "`experimental_io_device` option in `tf.saved_model.SaveOptions` "
                "to the io_device such as '/job:localhost'."
            ) from err
    save_lib.pywrap_saved_model.Save(export_dir)
    compat = save_lib.compat  # `experimental_image_format` was left to stock (can_save_fast)
    path = save_lib.file_io.join(compat.as_str(export_dir), compat.as_str(save_lib.constants.SAVED_MODEL_FILENAME_PB))
    save_lib.file_io.atomic_write_string_to_file(path, saved_model.SerializeToString(deterministic=True))
    save_lib.fingerprinting_utils.write_fingerprint(export_dir)
    if options.save_debug_info:
        save_lib._export_debug_info(exported_graph, export_dir)
    save_lib.metrics.SetWritePath(saved_model_path=str(export_dir))
    ops.dismantle_graph(exported_graph)
    return saved_nodes, node_paths


# Whether the variables start being written while TensorFlow traces (see `_EarlyWrite`).
WRITE_WHILE_TRACING = True


class _EarlyWrite:
    """Writes the model's own checkpoint tensors on a background thread, then completes the bundle
    from the SavedModel's real list of tensors (`finish`)."""

    def __init__(self, writer, model, threads: int):
        self._writer = writer
        self._threads = threads
        self._error: BaseException | None = None
        self._early = []
        if WRITE_WHILE_TRACING:
            with contextlib.suppress(NotFast):
                self._early = checkpoint_tensors(model._checkpoint._saver)[:-1]  # the object graph will differ
        self._thread = threading.Thread(target=self._write_early, name="kerassave-bundle", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._thread.join()  # never leave the thread writing into files being removed

    def _write_early(self) -> None:
        try:
            # One writer by default: TensorFlow traces on the other core meanwhile (measured on 2 cores:
            # two writers beside the tracing were no faster).
            self._writer.add(tensor_bundle.items(self._early), self._threads or 1)
        except BaseException as e:  # re-raised by `finish`
            self._error = e

    def finish(self, tensors: list[BundleTensor]) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error
        done = len(self._early)
        if not all(_same(a, b) for a, b in zip(self._early, tensors[:done], strict=False)) or len(tensors) <= done:
            self._writer.reset()
            done = 0
        self._writer.add(tensor_bundle.items(tensors[done:]), self._threads)
        self._writer.finish()


def _same(written: BundleTensor, wanted: BundleTensor) -> bool:
    """Whether `written` put exactly `wanted`'s bytes where `wanted` goes: same key, dtype, shape, and the
    same buffer (a variable assigned since has another: TensorFlow copies on write while a view is held)."""
    if (written.key, written.dtype, written.shape) != (wanted.key, wanted.dtype, wanted.shape):
        return False
    if isinstance(written.value, np.ndarray) and isinstance(wanted.value, np.ndarray):
        a, b = written.value, wanted.value
        return a.nbytes == b.nbytes and (a.nbytes == 0 or a.ctypes.data == b.ctypes.data)
    return written.value == wanted.value


# --- the directory ------------------------------------------------------------------------------


@contextlib.contextmanager
def _staged_directory(filepath: str) -> Iterator[str]:
    """Yields where to write the SavedModel: a new directory beside `filepath`, moved into place
    when the block completes (removed if it fails); or `filepath` itself when it holds more than a
    SavedModel (other files stock would leave alone) or is not a directory (stock's errors then)."""
    target = os.path.realpath(filepath)  # a symlink to a directory: the directory is what is replaced
    previous = _entries_or_none(target)
    if previous is not None and not previous <= SAVED_MODEL_ENTRIES:
        yield filepath
        sync(filepath)
        return
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    try:
        staging = staging_directory(target)
    except PermissionError:
        if previous is None:
            raise
        yield filepath  # a directory we may write into, in a parent we may not: in place, as stock
        sync(filepath)
        return
    try:
        mode = os.stat(target).st_mode & 0o7777 if previous is not None else 0o777 & ~_umask()
        os.chmod(staging, mode)
        yield staging
        sync(staging)
        _move_into_place(staging, target)
        sync_name(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _entries_or_none(path: str) -> set[str] | None:
    """The names in directory `path`, None if nothing is there; a file there gives a non-SavedModel entry."""
    try:
        return set(os.listdir(path))
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return {""}


def _umask() -> int:
    from ..files import _umask

    return _umask()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _move_into_place(staging: str, target: str) -> None:
    """Renames `staging` to `target`; an existing `target` directory is swapped out atomically where
    the OS allows (else moved aside first), then removed."""
    try:
        os.rename(staging, target)
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if not _exchange(staging, target):
        aside = staging_directory(target, suffix=".old")
        os.rename(target, os.path.join(aside, "old"))
        os.rename(staging, target)
        staging = aside
    shutil.rmtree(staging, ignore_errors=True)  # the previous SavedModel


def _exchange(a: str, b: str) -> bool:
    """`renameat2(a, b, RENAME_EXCHANGE)`: False where the C library or the file system lacks it."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


# --- loading ------------------------------------------------------------------------------------


def can_load_fast(path: str | None, kwargs: dict) -> bool:
    """Whether tf_keras' `load_model(path, **kwargs)` loads a local SavedModel whose checkpoint this
    module can read as TensorFlow would."""
    import tensorflow as tf

    if path is None or not set(kwargs) <= {"options"} or not os.path.isdir(path):
        return False
    options = kwargs.get("options")
    if options is not None and options.experimental_io_device:  # read by another device
        return False
    if not os.path.isfile(tensor_bundle.index_path(os.path.join(path, "variables", "variables"))):
        return False
    return tf.executing_eagerly() and tf_internals_supported() and _tf_loader() is not None


def _tf_loader():
    """TensorFlow's SavedModel `Loader`, if it has what our checkpoint restore replaces and uses."""
    from tensorflow.python.saved_model import load as load_lib

    loader = getattr(load_lib, "Loader", None)
    if loader is None or not hasattr(loader, "_restore_checkpoint") or not hasattr(load_lib, "path_helpers"):
        return None
    return loader


def load(stock_load_model, path: str, threads: int = 0, **kwargs):
    """`stock_load_model(path, **kwargs)` -- tf_keras' own `load_model`, every step stock's -- with
    the SavedModel's checkpoint read by the Rust core; then the optimizer's saved state, which stock
    drops (it compiles a fresh optimizer), restored into the compiled model's optimizer."""
    import tensorflow as tf

    _install_fast_restore()
    compile = kwargs.get("compile", True)
    bundle = BundleReader(os.path.join(path, "variables", "variables"))
    # Every tensor is read while the model is built and TensorFlow loads the graph: the restore
    # below finds them read.
    keys = [e.key for e in bundle.entries.values() if e.dtype not in NOT_READ_AHEAD and not e.partitioned]
    bundle.read_ahead(keys, [tf.as_dtype(bundle.entries[k].dtype).as_numpy_dtype for k in keys], threads)
    _fast_restore.threads, _fast_restore.compile, _fast_restore.bundle = threads, compile, bundle
    try:
        with _no_slot_warning():
            model = stock_load_model(path, **kwargs)
        if compile:
            restore_optimizer(model, bundle, threads)
    finally:
        del _fast_restore.threads, _fast_restore.compile, _fast_restore.bundle
        bundle.join()
    return model


# Bundle dtypes left to TensorFlow's own reads: strings, resources, variants.
NOT_READ_AHEAD = frozenset({DT_STRING, 20, 21})


# Set on a thread while it loads a SavedModel through `load`: TensorFlow's loader then restores the
# checkpoint through our reader. Other threads (stock loads included) get TensorFlow's own restore.
_fast_restore = threading.local()
_HOOK_LOCK = threading.Lock()


def _install_fast_restore() -> None:
    """Wraps, once per process, TensorFlow's `Loader._restore_checkpoint` so that a load through `load`
    on this thread reads the checkpoint through the Rust core."""
    loader = _tf_loader()
    with _HOOK_LOCK:
        stock_restore = loader._restore_checkpoint
        if hasattr(stock_restore, "stock_restore_checkpoint"):
            return

        @functools.wraps(stock_restore)
        def _restore_checkpoint(self):
            threads = getattr(_fast_restore, "threads", None)
            if threads is None:
                return stock_restore(self)
            try:
                return _restore_loader_checkpoint(self, threads)
            except NotFast:  # restores again, everything, as stock
                return stock_restore(self)

        _restore_checkpoint.stock_restore_checkpoint = stock_restore
        loader._restore_checkpoint = _restore_checkpoint


def _restore_loader_checkpoint(loader, threads: int) -> None:
    """`Loader._restore_checkpoint` (tensorflow/python/saved_model/load.py, eager) through our reader."""
    from tensorflow.python.checkpoint import checkpoint, graph_view
    from tensorflow.python.saved_model import load as load_lib

    variables_path = load_lib.path_helpers.get_variables_path(loader._export_dir)
    root = loader.get(0)
    saver = checkpoint.TrackableSaver(graph_view.ObjectGraphView(root))
    # The optimizer revived here is one stock's `load` replaces when it compiles the model: its state
    # is read once, by `restore_optimizer`, into the optimizer that replaces it.
    unused = _is_optimizer_state if _fast_restore.compile and _training_config(root) is not None else None
    status = restore_with_saver(
        saver, variables_path, threads, loader._checkpoint_options, unused, bundle=_fast_restore.bundle
    )
    if loader._save_options.allow_partial_checkpoint:
        status.expect_partial().assert_nontrivial_match()
    else:
        status.assert_existing_objects_matched()


def _training_config(root):
    """What tf_keras' SavedModel `load` compiles a revived model with (None: it does not compile)."""
    from tf_keras.src.engine import training

    if not isinstance(root, training.Model):
        return None
    return root._serialized_attributes.get("metadata", {}).get("training_config")


def _is_optimizer_state(key: str) -> bool:
    """Whether a checkpoint key of a tf_keras model holds its optimizer's state."""
    return key.startswith("optimizer/") or "/.OPTIMIZER_SLOT/optimizer/" in key


@contextlib.contextmanager
def _no_slot_warning():
    """Drops stock's "Slots cannot be restored from saved_model" warning, which `load` makes untrue."""

    def keep(record) -> bool:
        return "Slots cannot be restored from saved_model" not in record.getMessage()

    logger = logging.getLogger("tensorflow")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def restore_optimizer(model, bundle: BundleReader, threads: int = 0) -> bool:
    """Builds the optimizer `compile` gave a loaded model and restores the state the SavedModel's
    checkpoint holds for it, when that state has exactly the keys, dtypes and shapes the built
    optimizer saves; otherwise leaves it fresh, as stock does. Returns whether it restored."""
    from tf_keras.src.engine import training
    from tf_keras.src.mixed_precision import loss_scale_optimizer
    from tf_keras.src.optimizers import optimizer as optimizer_lib
    from tf_keras.src.optimizers.legacy import optimizer_v2

    optimizer = getattr(model, "optimizer", None)
    if not isinstance(model, training.Model) or optimizer is None:
        return False
    variables = model.trainable_variables
    if isinstance(optimizer, optimizer_lib.Optimizer | loss_scale_optimizer.LossScaleOptimizerV3):
        optimizer.build(variables)  # as the first `apply_gradients` would
        slots_hang_from_variables = False
    elif isinstance(optimizer, optimizer_v2.OptimizerV2):
        optimizer._create_all_weights(variables)
        slots_hang_from_variables = True
    else:
        return False
    try:
        wanted = {t.key: (t.dtype, t.shape) for t in checkpoint_tensors(model._checkpoint._saver)}
    except NotFast:
        return False

    saved = set(filter(_is_optimizer_state, bundle.entries))
    if not saved or saved != set(filter(_is_optimizer_state, wanted)):
        return False
    if any((bundle.entries[k].dtype, bundle.entries[k].shape) != wanted[k] for k in saved):
        return False
    if slots_hang_from_variables:  # slots are matched through the variables they belong to
        restore(model._checkpoint, bundle.prefix, threads, bundle).expect_partial()
        return True
    return restore_dependency(model, "optimizer", bundle.prefix, threads, bundle)
