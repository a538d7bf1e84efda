"""The stock functions kerassave_fast hands work to, as stock defines them.

Each is looked up once and kept, so that routing stock's own entry points through kerassave_fast
(as a user's patch, or `install()`, does) never makes our delegation call back into us.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable

KERAS3_SAVING_API = "keras.src.saving.saving_api"
TF_KERAS_SAVING_API = "tf_keras.src.saving.saving_api"

_ORIGINALS: dict[tuple[str, str], Callable] = {}
_LOCK = threading.Lock()


def stock(module: str, name: str) -> Callable:
    """`module.name` as first seen: call `pin` before anything replaces it."""
    key = (module, name)
    with _LOCK:
        function = _ORIGINALS.get(key)
    if function is None:
        # Imported without the lock: with KERASSAVE_FAST=1, a first import of Keras runs `install()`,
        # which pins (so takes the lock) before it routes anything; what it pinned is kept.
        imported = importlib.import_module(module)
        with _LOCK:
            function = _ORIGINALS.setdefault(key, getattr(imported, name))
    return function


def pin(module: str, *names: str) -> None:
    """Keeps the current `module.<name>`s as the stock ones (before they are patched)."""
    for name in names:
        stock(module, name)


pin(KERAS3_SAVING_API, "save_model", "load_model", "save_weights", "load_weights")
