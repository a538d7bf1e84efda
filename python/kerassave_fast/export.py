"""`export_saved_model`: the inference SavedModel `model.export(path)` writes (Keras 3's
`format="tf_saved_model"`, tf_keras' `export`), with its variables written by the Rust core while
TensorFlow traces.

Stock's `export` runs unchanged; its one call to `tf.saved_model.save` is routed, on this thread
only, to formats/saved_model.py (the same directory, byte-identical `variables/`, moved into place
when complete). Options that only TensorFlow's writer handles go to it.
"""

from __future__ import annotations

import functools
import os
import threading

from .formats import saved_model

# Set on a thread while it exports through `export_saved_model`: `tf.saved_model.save` then writes
# through us. Other threads, and every other caller, get TensorFlow's own function.
_routing = threading.local()
_ROUTE_LOCK = threading.Lock()


def export_saved_model(model, filepath, threads: int = 0, max_shard_bytes: int | None = None, **kwargs) -> None:
    """`model.export(filepath, **kwargs)` as stock does it, the variables written by the Rust core (in
    data shards of at most `max_shard_bytes`, if given)."""
    _route_saved_model_save()
    _routing.threads, _routing.max_shard_bytes = threads, max_shard_bytes
    try:
        model.export(os.fspath(filepath), **kwargs)
    finally:
        del _routing.threads, _routing.max_shard_bytes


def _route_saved_model_save() -> None:
    """Wraps, once per process, `tf.saved_model.save` so that an export through `export_saved_model`
    on this thread writes through formats/saved_model.py."""
    import tensorflow as tf

    with _ROUTE_LOCK:
        stock_save = tf.saved_model.save
        if hasattr(stock_save, "stock_save"):
            return
        # Keras 3 calls it as `tf.saved_model.save`, tf_keras as `tf.compat.v2.saved_model.save`.
        modules = [m for m in (tf.saved_model, tf.compat.v2.saved_model) if m.save is stock_save]

        @functools.wraps(stock_save)
        def save(obj, export_dir, signatures=None, options=None):
            threads = getattr(_routing, "threads", None)
            if threads is None or not saved_model.can_write(options):
                return stock_save(obj, export_dir, signatures=signatures, options=options)
            return saved_model.save(obj, export_dir, signatures, options, threads, _routing.max_shard_bytes)

        save.stock_save = stock_save
        for module in modules:
            module.save = save
