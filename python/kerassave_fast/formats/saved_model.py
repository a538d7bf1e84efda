"""TensorFlow SavedModel directories (`tf.saved_model.save`, tf_keras' `save_format="tf"`, Keras 3's
`export`): TensorFlow writes the graph, the Rust core writes `variables/`; no Keras here.

The steps are TensorFlow's `save_and_return_nodes` (tensorflow/python/saved_model/save.py), run with
the same internals, except for the variables: instead of `object_saver.save`, the tensors
`TrackableSaver` would hand `SaveV2` are written by the Rust bundle writer (formats/tf_checkpoint.py).
Their bytes do not wait for the graph: before TensorFlow traces, the tensors the caller knows come
first in the SavedModel's checkpoint (a tf_keras model's own checkpoint; the saved object's, by
default) start being written on a background thread while TensorFlow traces (the GIL is released
while the bytes move). After tracing, the SavedModel's real list of tensors is compared with what
was written -- same keys, same variables, same buffers -- the rest (tf_keras' `keras_api` metrics,
the object graph of the SavedModel) is appended, and the index written; if anything differs, the
data file is rewritten from the real list. The bundle is complete before `fingerprint.pb` is
computed, which hashes it.

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
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator

import numpy as np

from ..files import staging_directory, sync, sync_name
from . import tensor_bundle
from .tensor_bundle import BundleTensor
from .tf_checkpoint import NotFast, checkpoint_tensors, tf_internals_supported

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


def can_write(options) -> bool:
    """Whether a SavedModel with these `tf.saved_model.SaveOptions` is one this module writes as
    TensorFlow does (eager, a checked TensorFlow, its save internals present)."""
    import tensorflow as tf

    if options is not None and (
        options.experimental_io_device  # the checkpoint is then written by other devices,
        or options.experimental_sharding_callback  # or in other shards,
        or options.experimental_image_format  # or the graph by a splitter TensorFlow's OSS build lacks
    ):
        return False
    return tf.executing_eagerly() and tf_internals_supported() and _tf_save_internals() is not None


def save(
    obj, export_dir: str, signatures=None, options=None, threads: int = 0, max_shard_bytes: int | None = None
) -> None:
    """`tf.saved_model.save(obj, export_dir, signatures, options)` with the variables written by the
    Rust core while TensorFlow traces (in shards, with `max_shard_bytes`), into a directory moved into
    place when complete. The caller checked `can_write(options)`."""
    from tensorflow.python.saved_model import save as save_lib

    export_dir = os.fspath(export_dir)
    save_lib.metrics.IncrementWriteApi(save_lib._SAVE_V2_LABEL)
    with staged_directory(export_dir) as staging:
        save_and_return_nodes(obj, staging, signatures, options, threads, max_shard_bytes=max_shard_bytes)
    save_lib.metrics.IncrementWrite(write_version="2")


def save_and_return_nodes(
    obj,
    export_dir: str,
    signatures=None,
    options=None,
    threads: int = 0,
    first_tensors: Callable[[], list[BundleTensor]] | None = None,
    max_shard_bytes: int | None = None,
):
    """TensorFlow's `save_and_return_nodes` (saved_model/save.py), its checkpoint written by the Rust
    core, overlapped with the tracing: `first_tensors()` (by default, `obj`'s own checkpoint) gives
    the tensors expected to come first in the SavedModel's checkpoint, written while TensorFlow traces.
    With `max_shard_bytes`, the checkpoint is cut into data shards of at most that size, written side
    by side once TensorFlow has traced."""
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
        if max_shard_bytes is None:
            first_tensors = first_tensors or (lambda: _own_checkpoint_tensors(obj))
            with tensor_bundle.writing(prefix) as writer, _EarlyWrite(writer, first_tensors, threads) as early:
                _, exported_graph, object_saver, asset_info, saved_nodes, node_paths = save_lib._build_meta_graph(
                    obj, signatures, options, meta_graph_def
                )
                early.finish(checkpoint_tensors(object_saver))
        else:
            _, exported_graph, object_saver, asset_info, saved_nodes, node_paths = save_lib._build_meta_graph(
                obj, signatures, options, meta_graph_def
            )
            tensor_bundle.write(prefix, checkpoint_tensors(object_saver), threads, max_shard_bytes)
    except NotFast:  # stock's own checkpoint writer, as stock calls it (sharded by TensorFlow's policy)
        sharding = options.experimental_sharding_callback
        if max_shard_bytes is not None:
            from tensorflow.python.checkpoint.sharding import sharding_policies

            sharding = sharding_policies.MaxShardSizePolicy(max_shard_size=max_shard_bytes)
        ckpt_options = checkpoint_options.CheckpointOptions(
            experimental_io_device=options.experimental_io_device,
            experimental_sharding_callback=sharding,
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
    compat = save_lib.compat  # `experimental_image_format` was left to stock (`can_write`)
    path = save_lib.file_io.join(compat.as_str(export_dir), compat.as_str(save_lib.constants.SAVED_MODEL_FILENAME_PB))
    save_lib.file_io.atomic_write_string_to_file(path, saved_model.SerializeToString(deterministic=True))
    save_lib.fingerprinting_utils.write_fingerprint(export_dir)
    if options.save_debug_info:
        save_lib._export_debug_info(exported_graph, export_dir)
    save_lib.metrics.SetWritePath(saved_model_path=str(export_dir))
    ops.dismantle_graph(exported_graph)
    return saved_nodes, node_paths


def _own_checkpoint_tensors(obj) -> list[BundleTensor]:
    """What `tf.train.Checkpoint(root=obj)` would save, in its order."""
    from tensorflow.python.checkpoint import checkpoint, graph_view

    return checkpoint_tensors(checkpoint.TrackableSaver(graph_view.ObjectGraphView(obj)))


# Whether the variables start being written while TensorFlow traces (see `_EarlyWrite`).
WRITE_WHILE_TRACING = True


class _EarlyWrite:
    """Writes the tensors expected first on a background thread, then completes the bundle from the
    SavedModel's real list of tensors (`finish`)."""

    def __init__(self, writer, first_tensors: Callable[[], list[BundleTensor]], threads: int):
        self._writer = writer
        self._threads = threads
        self._error: BaseException | None = None
        self._early = []
        if WRITE_WHILE_TRACING:
            with contextlib.suppress(NotFast):
                self._early = first_tensors()[:-1]  # the object graph will differ
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


# --- the directory --------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_directory(filepath: str) -> Iterator[str]:
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
        if previous:
            _carry_over_unwritten(target, staging)
        sync(staging)
        _move_into_place(staging, target)
        sync_name(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _carry_over_unwritten(target: str, staging: str) -> None:
    """Puts into the new SavedModel what the previous one holds and this save did not write, at any
    depth: stock writes into the directory, so those stay (`assets.extra`, TF Serving's warm-up
    requests; a file in `assets/` that the graph still names though the model, revived from this
    directory, no longer tracks it; a user's file). Only the data shards of the previous
    checkpoint are left behind: the new index names none of them."""
    stale_shards = os.path.join(target, "variables")
    made: list[tuple[str, str]] = []  # directories made here: their modes are copied once they are filled

    def unreadable(error: OSError) -> None:
        raise error  # (`os.walk` would skip it: its files would be lost with the old directory)

    for root, directories, files in os.walk(target, onerror=unreadable):
        into = os.path.join(staging, os.path.relpath(root, target))
        links = [name for name in directories if os.path.islink(os.path.join(root, name))]  # kept as links
        for name in list(directories):
            source, destination = os.path.join(root, name), os.path.join(into, name)
            if name in links:
                directories.remove(name)
            elif not os.path.lexists(destination):
                os.mkdir(destination)
                made.append((source, destination))
            elif not os.path.isdir(destination) or os.path.islink(destination):
                directories.remove(name)  # this save wrote a file there: the old directory goes
        for name in files + links:
            source, destination = os.path.join(root, name), os.path.join(into, name)
            if os.path.lexists(destination) or (root == stale_shards and name.startswith("variables.data-")):
                continue
            try:
                os.link(source, destination, follow_symlinks=False)  # the old directory is removed next
            except OSError:
                shutil.copy2(source, destination, follow_symlinks=False)
    for source, destination in reversed(made):  # deepest first: a read-only one is filled already
        shutil.copystat(source, destination)


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
