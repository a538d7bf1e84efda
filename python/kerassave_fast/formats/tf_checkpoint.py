"""TensorFlow's object-based checkpoints (`tf.train.Checkpoint`, what tf_keras' TF-format weights and
every SavedModel's `variables/` hold) over our tensor bundle; no Keras here.

TensorFlow's own Python decides everything but the bytes: `save_util.serialize_graph_view` (as
`TrackableSaver.save` calls it) gives the object graph and the tensors in `SaveV2`'s order, and
restoring runs TensorFlow's `_CheckpointRestoreCoordinator` and `CheckpointPosition` walk, so
matching, deferred restoration (optimizer slots created later) and the returned
`CheckpointLoadStatus` are stock's. The Rust core writes the bundle (tensor bytes taken from the
variables' buffers, CRC32C computed while writing) and reads the tensors the walk restores now
(parallel preads into aligned arrays that the variables adopt, CRC32C checked). Values restored
later, when their variable is created, are read through the same reader.

Private TensorFlow API (tensorflow/python/checkpoint/, TF 2.21): anything this module cannot do
exactly as stock -- another TensorFlow version, graph mode, checkpoint options, registered savers,
partitioned or sliced tensors, several devices -- raises `NotFast` (or returns False) for the
caller to hand to stock.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np

from .._core import OBJECT_GRAPH_KEY
from ..tensors import adoptable, adoptable_tensor
from .tensor_bundle import DT_STRING, BundleReader, BundleTensor

# TensorFlow versions whose checkpoint internals this module was checked against.
CHECKED_TF_VERSIONS = ((2, 21),)


class NotFast(Exception):
    """The fast path cannot do this exactly as stock: the caller hands the work to stock."""


_warned = threading.Event()


def tf_internals_supported() -> bool:
    """Whether the installed TensorFlow is one whose private checkpoint API this module follows."""
    import tensorflow as tf

    version = tuple(int(p) for p in tf.__version__.split(".")[:2] if p.isdigit())
    if version in CHECKED_TF_VERSIONS:
        return True
    if not _warned.is_set():
        _warned.set()
        warnings.warn(
            f"kerassave_fast: TensorFlow {tf.__version__} is not one whose checkpoint internals were checked "
            f"({', '.join('.'.join(map(str, v)) for v in CHECKED_TF_VERSIONS)}); TF checkpoints "
            "(TF-format weights) and SavedModels are saved and loaded by stock TensorFlow.",
            stacklevel=3,
        )
    return False


# --- saving ---------------------------------------------------------------------------------------


def _is_plain_variable(trackable) -> bool:
    from tensorflow.python.ops import resource_variable_ops

    base = resource_variable_ops.BaseResourceVariable
    return isinstance(trackable, base) and type(trackable)._serialize_to_tensors is base._serialize_to_tensors


def _cpu_task(device) -> str:
    """The task `MultiDeviceSaver` files a tensor under: one task makes one shard."""
    from tensorflow.python.framework import device as device_lib
    from tensorflow.python.training.saving import saveable_object_util

    name = device if isinstance(device, str) else device.to_string()
    return device_lib.DeviceSpec.from_string(saveable_object_util.set_cpu0(name)).to_string()


_object_graph_device: list[str] = []


def _object_graph_task() -> str:
    """The device of the object graph constant `TrackableSaver` makes under `/cpu:0`."""
    if not _object_graph_device:
        from tensorflow.python.framework import constant_op, dtypes, ops

        with ops.device("/cpu:0"):
            _object_graph_device.append(constant_op.constant(b"", dtype=dtypes.string).device)
    return _cpu_task(_object_graph_device[0])


def _bundle_tensor(key: str, tensor) -> BundleTensor:
    """A tensor as the bundle stores it: a view of its buffer, or its strings."""
    import tensorflow as tf

    dtype = tf.as_dtype(tensor.dtype)
    if dtype in (tf.resource, tf.variant) or not hasattr(tensor, "numpy"):
        raise NotFast(f"{key}: a {dtype.name} tensor")
    array = np.asarray(tensor)  # an eager CPU tensor: a read-only view of its buffer
    if dtype == tf.string:
        return BundleTensor(key, DT_STRING, array.shape, [bytes(s) for s in array.reshape(-1)])
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return BundleTensor(key, dtype.as_datatype_enum, array.shape, array)


def checkpoint_tensors(saver) -> list[BundleTensor]:
    """What `TrackableSaver.save` hands `SaveV2` for an eager save, in its order: each trackable's
    serialized tensors in object-graph order, then `_CHECKPOINTABLE_OBJECT_GRAPH`.

    `saver` is a `TrackableSaver` (a `tf.train.Checkpoint`'s `_saver`, or tf_keras' `model._checkpoint._saver`).
    """
    from tensorflow.python.checkpoint import save_util
    from tensorflow.python.ops import resource_variable_ops
    from tensorflow.python.trackable import base as trackable_base
    from tensorflow.python.training.saving import saveable_object

    serialized, _, registered_savers, graph_proto = save_util.serialize_graph_view(
        saver._graph_view, saver._object_map, cache=saver._cache
    )
    if registered_savers:
        raise NotFast("registered savers write files of their own")
    tensors, tasks = [], {_object_graph_task()}
    variable_suffix = "/" + trackable_base.VARIABLE_VALUE_KEY
    for trackable, tensor_dict in serialized.items():
        for key, value in tensor_dict.items():
            if isinstance(value, dict):
                if set(value) != {""}:
                    raise NotFast(f"{key}: a sliced (partitioned) tensor")
                value = value[""]
            spec = value
            if not isinstance(spec, saveable_object.SaveSpec):
                spec = saveable_object.SaveSpec(value, "", key, dtype=value.dtype, device=value.device)
            elif spec.slice_spec or spec.name != key:
                raise NotFast(f"{key}: saved under another name or as a slice")
            tasks.add(_cpu_task(spec.device))
            if len(tasks) > 1:
                raise NotFast("tensors on several tasks are saved as several shards")
            if _is_plain_variable(trackable) and key.endswith(variable_suffix) and len(tensor_dict) == 1:
                # The variable's current buffer, read as its `_serialize_to_tensors` would, without its
                # identity op; like stock, an uninitialized variable is left out.
                if not trackable.is_initialized():
                    continue
                tensor = resource_variable_ops.BaseResourceVariable.value(trackable)
            else:
                from tensorflow.python.framework import ops

                with ops.device(spec.device):
                    tensor = spec.tensor
                if tensor is None:
                    continue
            tensors.append(_bundle_tensor(key, tensor))
    tensors.append(BundleTensor(OBJECT_GRAPH_KEY, DT_STRING, (), [graph_proto.SerializeToString()]))
    return tensors


# --- loading --------------------------------------------------------------------------------------


class BundleCheckpointReader:
    """The part of `py_checkpoint_reader.CheckpointReader` TensorFlow's restore walk uses, over our reader."""

    def __init__(self, bundle: BundleReader):
        import tensorflow as tf

        self.bundle = bundle
        self._dtypes = {k: tf.as_dtype(e.dtype) for k, e in bundle.entries.items()}

    def get_variable_to_dtype_map(self):
        return dict(self._dtypes)

    def get_variable_to_shape_map(self):
        return {k: list(e.shape) for k, e in self.bundle.entries.items()}

    def has_tensor(self, key: str) -> bool:
        return key in self.bundle.entries

    def get_tensor(self, key: str):
        from tensorflow.python.framework import errors_impl

        entry = self.bundle.entries.get(key)
        if entry is None:
            raise errors_impl.NotFoundError(None, None, f"Key {key} not found in checkpoint")
        if entry.partitioned:
            raise NotFast(f"{key}: a partitioned tensor")
        if entry.dtype == DT_STRING:
            array = self.bundle.read_strings(key)
            return array.item() if array.ndim == 0 else array
        (array,) = self.bundle.read_arrays([key], [self._dtypes[key].as_numpy_dtype])
        return array


def _restore_coordinator_class():
    """`_CheckpointRestoreCoordinator` whose eager restores read through the Rust core."""
    from tensorflow.python.checkpoint import checkpoint as checkpoint_lib
    from tensorflow.python.checkpoint import functional_saver
    from tensorflow.python.eager import context
    from tensorflow.python.framework import constant_op, ops
    from tensorflow.python.trackable import trackable_utils
    from tensorflow.python.training.saving import saveable_object_util

    class FastRestoreCoordinator(checkpoint_lib._CheckpointRestoreCoordinator):
        def __init__(self, *args, fast_reader: BundleCheckpointReader, threads: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.fast_reader = fast_reader
            self.threads = threads
            self.unused = None  # a predicate on keys whose values nobody will use (not read)

        def restore_saveables(self, tensor_saveables, python_positions, registered_savers=None, reader=None):
            if registered_savers or not context.executing_eagerly():
                return super().restore_saveables(tensor_saveables, python_positions, registered_savers, reader)
            reader = reader or self.fast_reader
            for position in python_positions:
                key = position.object_proto.attributes[0].checkpoint_key
                if self.unused is not None and self.unused(key):
                    continue
                position.trackable.deserialize(reader.get_tensor(key))
            if tensor_saveables:
                flat = saveable_object_util.validate_and_slice_inputs(tensor_saveables)
                saver = functional_saver.MultiDeviceSaver.from_saveables(flat)
                if not self._restore_read_here(saver):
                    saver.restore(self.save_path_tensor, self.options)
            return []

        def _restore_read_here(self, saver) -> bool:
            """`MultiDeviceSaver.restore` for one task, with `RestoreV2` replaced by our parallel read.
            False, having done nothing, when a tensor is not one we read exactly as `RestoreV2` does."""
            if saver._num_unique_tasks != 1 or len(saver._shardable_tensors_by_task) != 1:
                return False
            ((task, shard),) = saver._shardable_tensors_by_task.items()
            if context.is_custom_device(task.to_string()) or self.options.experimental_io_device:
                return False
            entries = self.fast_reader.bundle.entries
            restore_fn_of = saver._keys_to_restore_fn
            if self.unused is not None:
                unused_fns = {
                    fn for fn, keys in saver._restore_fn_to_keys.items() if all(self.unused(k) for k, _ in keys)
                }
                read = []
                for st in shard:
                    restore_fn = restore_fn_of[(st.checkpoint_key, st.slice_spec)]
                    if restore_fn not in unused_fns:
                        read.append(st)
                    elif not _fits(st, restore_fn, entries):
                        return False  # stock's restore reads them, and refuses what does not fit as it does
                shard = read
            names, dtypes, strings = [], [], {}
            for st in shard:
                save_spec = st._tensor_save_spec
                name, spec = (save_spec.name, save_spec.slice_spec) if save_spec else (st.checkpoint_key, st.slice_spec)
                entry = entries.get(name) if isinstance(name, str) else None
                if (
                    spec
                    or st.slice_spec
                    or entry is None
                    or entry.partitioned
                    or entry.dtype in (20, 21)  # resources, variants: RestoreV2's business
                    or entry.dtype != st.dtype.as_datatype_enum
                ):
                    return False
                if entry.dtype == DT_STRING:
                    strings[name] = self.fast_reader.bundle.read_strings(name)
                else:
                    names.append(name)
                    dtypes.append(st.dtype.as_numpy_dtype)
            arrays = iter(self.fast_reader.bundle.read_arrays(names, dtypes, self.threads))
            inputs: dict = {}
            pending = {fn: len(keys) for fn, keys in saver._restore_fn_to_keys.items()}
            with ops.device(task):
                for st in shard:
                    restore_fn = restore_fn_of[(st.checkpoint_key, st.slice_spec)]
                    name = st._tensor_save_spec.name if st._tensor_save_spec else st.checkpoint_key
                    if name in strings:
                        tensor = constant_op.constant(strings[name], dtype=st.dtype)
                    else:  # a dtype TensorFlow cannot take without a copy (float8, int4): copied, as stock
                        array = next(arrays)
                        tensor = adoptable_tensor(array) if adoptable(array) else constant_op.constant(array, st.dtype)
                    inputs.setdefault(restore_fn, {})[st.checkpoint_key] = tensor
                    pending[restore_fn] -= 1
                    if pending[restore_fn] == 0:
                        restore_fn(
                            {trackable_utils.extract_local_name(k): t for k, t in inputs.pop(restore_fn).items()}
                        )
            return True

    return FastRestoreCoordinator


def _fits(shardable, restore_fn, entries) -> bool:
    """Whether the checkpoint holds a tensor of the right dtype for it, and of the variable's shape
    where it restores a variable (what stock's restore checks as it reads it), without reading it."""
    from tensorflow.python.framework import tensor_shape
    from tensorflow.python.training.saving import saveable_object_util

    save_spec = shardable._tensor_save_spec
    entry = entries.get(save_spec.name if save_spec else shardable.checkpoint_key)
    if entry is None or entry.dtype != shardable.dtype.as_datatype_enum:
        return False
    owner = getattr(restore_fn, "__self__", None)  # a variable's `_restore_from_tensors`, or a revived one's
    if isinstance(owner, saveable_object_util.SaveableCompatibilityConverter):
        owner = owner.obj  # (revived by a SavedModel load: a converter of the variable's saveable)
    if isinstance(owner, saveable_object_util.TrackableSaveable):
        owner = owner._trackable
    shape = getattr(owner, "shape", None)
    if not isinstance(shape, tensor_shape.TensorShape) or not shape.is_fully_defined():
        return True  # (a saveable's: its shape is not known here)
    return tuple(entry.shape) == tuple(shape.as_list())


def restore(tf_checkpoint, save_path: str, threads: int = 0, bundle: BundleReader | None = None):
    """`tf.train.Checkpoint.read(save_path)` (eager, default options) through `TrackableSaver.restore`'s
    steps, reading the index and the tensors restored now through the Rust core (through `bundle`,
    the checkpoint at `save_path` already open, if given)."""
    return restore_with_saver(tf_checkpoint._saver, save_path, threads, bundle=bundle)


def restore_with_saver(saver, save_path: str, threads: int = 0, options=None, unused=None, bundle=None):
    """`saver.restore(save_path, options)` (`TrackableSaver`, eager) with our reads; returns stock's
    `CheckpointLoadStatus`. Variables whose every key `unused(key)` is true are matched but left
    unrestored (their tensors are not read)."""
    from tensorflow.python.checkpoint import checkpoint as checkpoint_lib
    from tensorflow.python.checkpoint import restore as restore_lib

    coordinator, reader = _restore_coordinator(saver, save_path, threads, options, bundle)
    coordinator.unused = unused
    object_graph_proto = coordinator.object_graph_proto
    restore_lib.CheckpointPosition(checkpoint=coordinator, proto_id=0).restore(saver._graph_view.root, reader)
    if saver._graph_view.attached_dependencies:  # as TrackableSaver.restore
        for ref in saver._graph_view.attached_dependencies:
            if ref.name == "root":
                continue
            proto_id = _child_id(object_graph_proto, ref.name)
            if proto_id is None or proto_id in coordinator.object_by_proto_id:
                continue
            restore_lib.CheckpointPosition(checkpoint=coordinator, proto_id=proto_id).restore(ref.ref, reader)
    return checkpoint_lib.CheckpointLoadStatus(
        coordinator, graph_view=saver._graph_view, feed_dict=None, options=coordinator.options
    )


def restore_dependency(root, name: str, save_path: str, threads: int = 0, bundle=None) -> bool:
    """Restores `root`'s checkpoint dependency `name` (and everything under it) from the checkpoint
    at `save_path`, as if the checkpoint's root were `root`; False when either side lacks it."""
    from tensorflow.python.checkpoint import checkpoint as checkpoint_lib
    from tensorflow.python.checkpoint import graph_view
    from tensorflow.python.checkpoint import restore as restore_lib

    trackable = root._lookup_dependency(name)
    if trackable is None:
        return False
    saver = checkpoint_lib.TrackableSaver(graph_view.ObjectGraphView(root))
    coordinator, reader = _restore_coordinator(saver, save_path, threads, bundle=bundle)
    coordinator.expect_partial = True  # the rest of the checkpoint is not for `trackable`
    proto_id = _child_id(coordinator.object_graph_proto, name)
    if proto_id is None:
        return False
    restore_lib.CheckpointPosition(checkpoint=coordinator, proto_id=proto_id).restore(trackable, reader)
    return True


def _child_id(object_graph_proto, name: str) -> int | None:
    """The node id of the root's child `name` in a checkpoint's object graph."""
    for proto_ref in object_graph_proto.nodes[0].children:
        if proto_ref.local_name == name:
            return proto_ref.node_id
    return None


def _restore_coordinator(saver, save_path: str, threads: int, options=None, bundle=None):
    """The `_CheckpointRestoreCoordinator` `TrackableSaver.restore` makes, reading through the Rust core."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2
    from tensorflow.python.checkpoint import checkpoint as checkpoint_lib
    from tensorflow.python.checkpoint import checkpoint_options
    from tensorflow.python.framework import constant_op, ops

    if checkpoint_lib._ASYNC_CHECKPOINT_THREAD is not None:
        checkpoint_lib._ASYNC_CHECKPOINT_THREAD.join()
    if bundle is None or bundle.prefix != save_path:
        bundle = BundleReader(save_path)
    if OBJECT_GRAPH_KEY not in bundle.entries:
        raise NotFast("a name-based (TF1) checkpoint")
    reader = BundleCheckpointReader(bundle)
    options = options or checkpoint_options.CheckpointOptions()
    with ops.device("/cpu:0"):
        file_prefix_tensor = constant_op.constant(save_path)
    object_graph_proto = trackable_object_graph_pb2.TrackableObjectGraph()
    object_graph_proto.ParseFromString(reader.get_tensor(OBJECT_GRAPH_KEY))
    coordinator = _restore_coordinator_class()(
        object_graph_proto=object_graph_proto,
        save_path=save_path,
        save_path_tensor=file_prefix_tensor,
        reader=reader,
        restore_op_cache=saver._restore_op_cache,
        graph_view=saver._graph_view,
        options=options,
        saveables_cache=saver._saveables_cache,
        fast_reader=reader,
        threads=threads,
    )
    return coordinator, reader
