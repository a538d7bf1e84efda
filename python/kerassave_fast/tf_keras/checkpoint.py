"""TF-format weights of tf_keras models: `model.save_weights(prefix)` / `model.load_weights(prefix)`
for a path that is not HDF5, i.e. a TF checkpoint `prefix.index` + `prefix.data-00000-of-00001`,
written and read by formats/tf_checkpoint.py exactly as stock's `tf.train.Checkpoint` of the model.
"""

from __future__ import annotations

import os

from ..files import sync
from ..formats import tensor_bundle
from ..formats.tf_checkpoint import NotFast, checkpoint_tensors, restore, tf_internals_supported
from ..overwrite import ask_to_replace

__all__ = ["NotFast", "can_load_fast", "can_save_fast", "load_weights", "save_weights", "weights_prefix"]


def is_tf_format_path(path: str) -> bool:
    """tf_keras' rule (saving_utils.is_hdf5_filepath, saving_api): anything but HDF5 and `.weights.h5`."""
    return not path.endswith((".h5", ".keras", ".hdf5"))


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def can_save_fast(model, path: str | None, save_format, options) -> bool:
    import tensorflow as tf

    if path is None or not is_tf_format_path(path) or path.endswith(".weights.h5"):
        return False
    if not path.isascii() and not _is_utf8(path):  # stock's TensorFlow refuses it before writing anything
        return False
    if save_format is not None and (
        not isinstance(save_format, str) or save_format.lower().strip() not in ("tf", "tensorflow")
    ):
        return False
    return options is None and tf.executing_eagerly() and tf_internals_supported()


def save_weights(
    model, filepath: str, overwrite: bool = True, threads: int = 0, max_shard_bytes: int | None = None
) -> bool:
    """tf_keras' `save_weights` (saving/legacy/save.py) for the TF format, in data shards of at most
    `max_shard_bytes` each if given. Returns False, having written nothing, when stock must do it (the
    overwrite question, if any, already answered yes)."""
    import tensorflow as tf

    model._assert_weights_created()
    index = tensor_bundle.index_path(filepath)
    if not overwrite and os.path.isfile(index) and not ask_to_replace(index, "tf_keras"):
        return True
    try:
        tensors = checkpoint_tensors(model._checkpoint._saver)
    except NotFast:
        return False
    directory = os.path.dirname(filepath)
    if directory:
        tf.io.gfile.makedirs(directory)  # as TrackableSaver.save makes it (and fails: FailedPreconditionError)
    tensor_bundle.write(filepath, tensors, threads, max_shard_bytes)
    tf.__internal__.train.update_checkpoint_state(
        save_dir=directory,
        model_checkpoint_path=filepath,
        save_relative_paths=True,
        all_model_checkpoint_paths=[filepath],
    )
    sync(os.path.join(directory, "checkpoint"))  # TensorFlow's bookkeeping file, when saves are durable
    return True


# --- loading ------------------------------------------------------------------------------------


def weights_prefix(path: str) -> str | None:
    """The bundle tf_keras' `load_weights` reads for `path` (legacy/save.py `_detect_save_format`): a
    checkpoint prefix, else a SavedModel's `variables/variables`; None when there is neither."""
    if os.path.isfile(tensor_bundle.index_path(path)):
        return path
    variables = os.path.join(path, "variables", "variables")
    if os.path.isdir(path) and os.path.isfile(tensor_bundle.index_path(variables)):
        from tensorflow.python.saved_model import loader_impl

        if loader_impl.contains_saved_model(path):
            return variables
    return None


def can_load_fast(model, path: str | None, by_name, skip_mismatch, options) -> bool:
    import tensorflow as tf

    if path is None or not is_tf_format_path(path) or path.endswith(".weights.h5"):
        return False
    if by_name or skip_mismatch or options is not None or not tf.executing_eagerly():
        return False
    checkpoint_options = getattr(model._checkpoint, "_checkpoint_options", None)
    if checkpoint_options is not None and checkpoint_options.experimental_enable_async_checkpoint:
        return False
    from tf_keras.src import backend

    if backend.is_tpu_strategy(model._distribution_strategy):
        return False
    return tf_internals_supported()


def load_weights(model, filepath: str, threads: int = 0):
    """tf_keras' `load_weights` (saving/legacy/save.py) for a TF checkpoint or a SavedModel's variables.
    Returns stock's status object; raises `NotFast` (having restored nothing) when stock must do it."""
    prefix = weights_prefix(filepath)
    if prefix is None:
        raise NotFast("no TF checkpoint here")
    status = restore(model._checkpoint, prefix, threads)
    status.assert_nontrivial_match()
    for layer in model.layers:
        layer.finalize_state()
    return status
