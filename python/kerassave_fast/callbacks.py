"""`AsyncModelCheckpoint`: a drop-in for `ModelCheckpoint` whose saves are written in the background.

Stock's callback decides when and where to save (`save_freq`, `save_best_only`, filepath
templates, `save_weights_only`); each save snapshots the model and returns while the file is
written, so the next training steps run during the write. At most one save is in flight: the next
one, and the end of `fit()`, wait for it, and a failed write raises there, naming its file; `wait()`
waits for it at any other time. A model with its own `save` or `save_weights` is saved by that, as
stock's callback saves it, and waited for. `AsyncModelCheckpoint` is Keras 3's (`keras.callbacks.ModelCheckpoint`);
`TFKerasAsyncModelCheckpoint` is tf_keras' (`tf.keras` under `TF_USE_LEGACY_KERAS=1`).
"""

from __future__ import annotations

import errno
import os

import keras
from keras.src.utils import file_utils, io_utils

from . import api
from .asynchronous import SaveHandle
from .files import MODEL_FILE_SUFFIXES


class _OneSaveInFlight:
    """The background save of a checkpoint callback, one at a time."""

    _in_flight: SaveHandle | None = None
    threads: int | None = None
    _model_class: type  # the flavour's `Model`, whose `save`/`save_weights` a model may override

    def wait(self) -> None:
        """Waits for the save in flight, if any; raises what its write raised."""
        handle, self._in_flight = self._in_flight, None
        if handle is not None:
            try:
                handle.result()
            except Exception as e:
                e.add_note(f"(the checkpoint being written in the background to {handle.path!r})")
                raise

    def _start_save(self, filepath: str, **kwargs) -> None:
        self.wait()
        if filepath.endswith(MODEL_FILE_SUFFIXES) and os.path.isdir(filepath):  # (a SavedModel is one)
            # raised now, as stock's save raises it, not by the background write
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), filepath)
        method = "save_weights" if self.save_weights_only else "save"
        if getattr(type(self.model), method) is not getattr(self._model_class, method):
            getattr(self.model, method)(filepath, overwrite=True, **kwargs)  # the model's own, as stock calls it
            return
        save = api.save_weights if self.save_weights_only else api.save_model
        self._in_flight = save(self.model, filepath, overwrite=True, blocking=False, threads=self.threads, **kwargs)

    def on_train_end(self, logs=None) -> None:
        super().on_train_end(logs)
        self.wait()


class AsyncModelCheckpoint(_OneSaveInFlight, keras.callbacks.ModelCheckpoint):
    """`keras.callbacks.ModelCheckpoint`, with the same arguments plus `threads` (I/O threads of
    each save), writing each checkpoint in the background."""

    _model_class = keras.Model

    def __init__(self, *args, threads: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads = threads

    def _save_model(self, epoch, batch, logs):
        """Stock's `_save_model` (keras/src/callbacks/model_checkpoint.py), the save not waited for."""
        filepath = self._get_file_path(epoch, batch, logs)
        if not self._should_save_model(epoch, batch, logs, filepath):
            return
        dirname = os.path.dirname(filepath)
        if dirname and not file_utils.exists(dirname):
            file_utils.makedirs(dirname)
        try:
            self._start_save(filepath)
        except IsADirectoryError:
            raise OSError(
                "Please specify a non-directory filepath for ModelCheckpoint. Filepath used is an existing "
                f"directory: {filepath}"
            ) from None
        if self.verbose > 0:
            io_utils.print_msg(f"\nEpoch {epoch + 1}: saving model to {filepath} in the background")


def _tf_keras_callback() -> type:
    import tf_keras

    class TFKerasAsyncModelCheckpoint(_OneSaveInFlight, tf_keras.callbacks.ModelCheckpoint):
        """tf_keras' `ModelCheckpoint`, with the same arguments plus `threads`, writing each
        checkpoint in the background (`.keras` and `.h5` files; other formats save as stock)."""

        _model_class = tf_keras.Model

        def __init__(self, *args, threads: int | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.threads = threads

        def _save_handler(self, filepath):
            """Stock's `_save_handler` (tf_keras/src/callbacks.py), the save not waited for."""
            native = filepath.endswith(".weights.h5" if self.save_weights_only else ".keras")
            self._start_save(filepath, **({} if native else {"options": self._options}))

        def _maybe_remove_file(self):
            """In multi-worker training, a worker that is not the chief saves into a temporary
            directory that stock deletes right after the save: its write must be over by then."""
            extended = self.model.distribute_strategy.extended
            if extended._in_multi_worker_mode() and not extended.should_checkpoint:
                self.wait()
            super()._maybe_remove_file()

    return TFKerasAsyncModelCheckpoint


def __getattr__(name: str):
    if name == "TFKerasAsyncModelCheckpoint":  # built on first use: importing tf_keras is not free
        globals()[name] = cls = _tf_keras_callback()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
