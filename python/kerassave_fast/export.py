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


def export_saved_model(model, filepath, threads: int = 0, **kwargs) -> None:
    """`model.export(filepath, **kwargs)` as stock does it, the variables written by the Rust core."""
    _route_saved_model_save()
    _routing.threads = threads
    try:
        model.export(os.fspath(filepath), **kwargs)
    finally:
        del _routing.threads


def _route_saved_model_save() -> None:
    """Wraps, once per process, `tf.saved_model.save` so that an export through `export_saved_model`
    on this thread writes through formats/saved_model.py."""
    import tensorflow as tf

    with _ROUTE_LOCK:
        stock_save = tf.saved_model.save
        if hasattr(stock_save, "stock_save"):
            return

        @functools.wraps(stock_save)
        def save(obj, export_dir, signatures=None, options=None):
            threads = getattr(_routing, "threads", None)
            if threads is None or not saved_model.can_write(options):
                return stock_save(obj, export_dir, signatures=signatures, options=options)
            return saved_model.save(obj, export_dir, signatures, options, threads)

        save.stock_save = stock_save
        tf.saved_model.save = save
