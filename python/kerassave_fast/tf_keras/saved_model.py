"""tf_keras SavedModels (`save_model(model, dir, save_format="tf")`, `load_model(dir)`).

Saving: tf_keras' legacy `save_model` and `saved_model/save.py` `save`, step by step, around
formats/saved_model.py (TensorFlow's graph, our `variables/`, written while TensorFlow traces
starting with the model's own checkpoint, which comes first in the SavedModel's).

Loading: tf_keras' own `load_model`, every step stock's, with TensorFlow's SavedModel loader
restoring the checkpoint through our reader on this thread, every tensor read while the model is
built; then the optimizer's saved state, which stock drops, restored into the compiled optimizer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading

from ..formats import saved_model, tensor_bundle
from ..formats.tensor_bundle import DT_STRING, BundleReader
from ..formats.tf_checkpoint import (
    NotFast,
    checkpoint_tensors,
    restore,
    restore_dependency,
    restore_with_saver,
    tf_internals_supported,
)
from ..overwrite import ask_to_replace

SAVE_KWARGS = frozenset({"include_optimizer", "signatures", "options", "save_traces"})


def can_save_fast(model, path: str | None, save_format, kwargs: dict) -> bool:
    """Whether `save_model(model, path, save_format=save_format, **kwargs)` is a SavedModel save
    this module does as stock does it."""
    from tf_keras.src.saving import saving_api
    from tf_keras.src.saving.legacy import saving_utils

    if path is None or not set(kwargs) <= SAVE_KWARGS:
        return False
    try:
        if saving_api.get_save_format(path, save_format) != "tf" or saving_utils.is_hdf5_filepath(path):
            return False
    except ValueError:  # stock's error for an unknown format
        return False
    return saved_model.can_write(kwargs.get("options"))


def save(
    model,
    filepath: str,
    overwrite: bool = True,
    include_optimizer: bool = True,
    signatures=None,
    options=None,
    save_traces: bool = True,
    threads: int = 0,
    max_shard_bytes: int | None = None,
) -> None:
    """tf_keras' legacy `save_model` for the SavedModel format (saving/legacy/save.py); the variables in
    data shards of at most `max_shard_bytes` each, if given."""
    from tf_keras.src.saving.legacy import saving_utils, serialization
    from tf_keras.src.saving.legacy.saved_model.utils import keras_option_scope

    saving_utils.try_build_compiled_arguments(model)
    with (
        serialization.SharedObjectSavingScope(),
        keras_option_scope(save_traces=save_traces, in_tf_saved_model_scope=True),
    ):
        _keras_saved_model_save(
            model, filepath, overwrite, include_optimizer, signatures, options, save_traces, threads, max_shard_bytes
        )


def _keras_saved_model_save(
    model, filepath, overwrite, include_optimizer, signatures, options, save_traces, threads, max_shard_bytes
):
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
        with saved_model.staged_directory(filepath) as export_dir:
            with serialization.SharedObjectSavingScope():
                with backend.deprecated_internal_learning_phase_scope(0):
                    with utils.keras_option_scope(save_traces):
                        saved_nodes, node_paths = saved_model.save_and_return_nodes(
                            model,
                            export_dir,
                            signatures,
                            options,
                            threads,
                            # the model's own checkpoint comes first in the SavedModel's
                            first_tensors=lambda: checkpoint_tensors(model._checkpoint._saver),
                            max_shard_bytes=max_shard_bytes,
                        )
                    metadata = keras_save.generate_keras_metadata(saved_nodes, node_paths)
            with tf.io.gfile.GFile(tf.io.gfile.join(export_dir, constants.SAVED_METADATA_PATH), "wb") as w:
                w.write(metadata.SerializeToString(deterministic=True))
    finally:
        if not include_optimizer:
            model.optimizer = orig_optimizer


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
    if tf.distribute.has_strategy():  # variables made by a distribution strategy: its own restore
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
    deferred = _DeferredInitialValues()
    _fast_restore.threads, _fast_restore.compile, _fast_restore.bundle = threads, compile, bundle
    _fast_restore.deferred = deferred
    try:
        with _no_slot_warning(), tf.variable_creator_scope(deferred.creator):
            model = stock_load_model(path, **kwargs)
        deferred.finish()  # no checkpoint was restored (`LoadOptions(experimental_skip_checkpoint=True)`)
        if compile:
            restore_optimizer(model, bundle, threads)
    finally:
        del _fast_restore.threads, _fast_restore.compile, _fast_restore.bundle, _fast_restore.deferred
        bundle.join()
    return model


class _DeferredInitialValues:
    """A variable creator for the layers tf_keras builds while it loads a SavedModel: a variable made
    with one of tf_keras' own initializers starts as uninitialized memory instead of computed values
    that the checkpoint restore would overwrite (on a big model, most of the build's time). The seed
    such an initializer draws is drawn at once, as stock's call would draw it, so every random stream
    afterwards is stock's. `finish` -- right after the restore, before anything reads a variable --
    gives each variable the restore did not reach its initializer's values, the values stock's has."""

    def __init__(self):
        self.active = True
        self.pending: list[tuple[object, functools.partial]] = []

    def creator(self, next_creator, **kwargs):
        initial_value = kwargs.get("initial_value")
        placeholder = _placeholder_for(initial_value) if self.active else None
        if placeholder is None:
            return next_creator(**kwargs)
        variable = next_creator(**{**kwargs, "initial_value": placeholder})
        self.pending.append((variable, initial_value))
        return variable

    def finish(self, coordinator=None) -> None:
        """Stops deferring; computes the initial values of the variables `coordinator` (the restore's
        `_CheckpointRestoreCoordinator`) did not restore -- of every deferred variable, without one."""
        self.active = False
        restored: set[int] = set()
        if coordinator is not None:
            nodes = coordinator.object_graph_proto.nodes
            for proto_id, trackable in list(coordinator.object_by_proto_id.items()):
                if nodes[proto_id].attributes:
                    restored.add(id(trackable))
                    restored.add(id(getattr(trackable, "_variable", None)))  # an AutoCastVariable's own
        for variable, initial_value in self.pending:
            if id(variable) not in restored:
                variable.assign(initial_value())
        self.pending.clear()


# tf_keras' own initializers: computing values is all they do (a stateless seed drawn once aside).
_KERAS_INITIALIZERS_MODULE = "tf_keras.src.initializers.initializers"


def _placeholder_for(initial_value):
    """An uninitialized tensor to stand for `initial_value` (what tf_keras' `make_variable` passes:
    `partial(initializer, shape, dtype=dtype)`), or None when it must be computed now."""
    import tensorflow as tf

    if not isinstance(initial_value, functools.partial) or set(initial_value.keywords) != {"dtype"}:
        return None
    initializer, args = initial_value.func, initial_value.args
    if type(initializer).__module__ != _KERAS_INITIALIZERS_MODULE or len(args) != 1:
        return None
    try:
        shape, dtype = tf.TensorShape(args[0]), tf.as_dtype(initial_value.keywords["dtype"])
    except (TypeError, ValueError):
        return None
    if not shape.is_fully_defined() or not (dtype.is_floating or dtype.is_integer or dtype.is_bool):
        return None
    generator = getattr(initializer, "_random_generator", None)
    if generator is not None:
        if getattr(generator, "_rng_type", None) != "stateless" or not hasattr(generator, "_maybe_init"):
            return None  # a stateful stream would advance: computed now, as stock
        generator._maybe_init()  # the seed stock's call would draw, drawn now
    return lambda: tf.raw_ops.Empty(shape=shape.as_list(), dtype=dtype, init=False)


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
            except NotFast:  # restores again, everything, as stock, over initialized variables
                _fast_restore.deferred.finish()
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
    _fast_restore.deferred.finish(status._checkpoint)
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
    if not isinstance(model, training.Model) or optimizer is None or _training_config(model) is None:
        return False  # not compiled by stock's load: its optimizer is the revived one, restored as stock
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
