"""Zero-code adoption: `install()` routes stock's saving entry points through kerassave_fast.

Routed: Keras 3's `keras.saving.{save_model,load_model,save_weights,load_weights}` (and every
other module attribute bound to them: `keras.models.*`, `keras._tf_keras.keras.*`, ...) and
`keras.Model.{save,save_weights,load_weights}`; the same for tf_keras when it is installed (so
`tf.keras` under `TF_USE_LEGACY_KERAS=1`, and `ModelCheckpoint`, which calls the `Model` methods).

Each replacement binds its arguments with the original's signature (a bad call raises stock's
`TypeError`) and hands kerassave_fast exactly what the caller passed. While a kerassave_fast call
runs on a thread, routed names called on that thread go straight to stock: what kerassave_fast
delegates, and the stock code that runs under it, run as stock. `KERASSAVE_FAST=1` in the
environment installs at import, or, when neither Keras nor tf_keras is imported yet, right after
the first of them is (`install_with_keras`): a process that never uses Keras, such as the
command line's `inspect` and `verify`, does not import Keras and TensorFlow for it.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
import threading
import warnings
from collections.abc import Callable

_LOCK = threading.RLock()
_INSIDE = threading.local()  # .depth: kerassave_fast calls running on this thread
# What install() changed, to undo: (owner, attribute, value before).
_UNDO: list[tuple[object, str, object]] = []


def installed() -> bool:
    """Whether stock's saving entry points are routed through kerassave_fast now."""
    return bool(_UNDO)


def _route(original: Callable, ours: Callable, model_first: bool) -> Callable:
    signature = inspect.signature(original)
    params = list(signature.parameters.values())
    first = params[0].name
    var_keyword = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    @functools.wraps(original)
    def routed(*args, **kwargs):
        if getattr(_INSIDE, "depth", 0):
            return original(*args, **kwargs)
        given = dict(signature.bind(*args, **kwargs).arguments)
        if var_keyword is not None:
            given.update(given.pop(var_keyword, {}))
        _INSIDE.depth = 1
        try:
            if model_first:
                return ours(given.pop(first), **given)
            return ours(**given)
        finally:
            _INSIDE.depth = 0

    routed.__kerassave_fast_original__ = original
    return routed


def _api(name: str, *first) -> Callable:
    """`api.<name>`, called with `first` before the caller's arguments, looked up at each call: with
    KERASSAVE_FAST=1, `install()` may run while `api` is being imported (its import of Keras)."""

    def call(*args, **kwargs):
        from . import api

        return getattr(api, name)(*first, *args, **kwargs)

    return call


def _flavour_entry_points(flavour: str, saving_api, *model_classes) -> list[tuple[object, str, Callable, bool]]:
    """(owner, attribute, ours, model_first) of a flavour's saving functions and `Model` methods."""
    save_model, save_weights, load_weights = _api("save_model"), _api("save_weights"), _api("load_weights")
    points = [
        (saving_api, "save_model", save_model, True),
        (saving_api, "load_model", _api("load_model_as", flavour), False),
        (saving_api, "save_weights", save_weights, True),
        (saving_api, "load_weights", load_weights, True),
        (model_classes[0], "save", save_model, True),
        (model_classes[0], "save_weights", save_weights, True),
    ]
    return points + [(cls, "load_weights", load_weights, True) for cls in model_classes]


def _entry_points() -> list[tuple[object, str, Callable, bool]]:
    """Every entry point to route, with what it routes to."""
    from keras.src.models import model as keras3_model
    from keras.src.saving import saving_api as keras3_api

    from .stock import KERAS3_SAVING_API, TF_KERAS_SAVING_API, pin  # (imports Keras: not at our import)

    pin(KERAS3_SAVING_API, "save_model", "load_model", "save_weights", "load_weights")
    points = _flavour_entry_points("keras3", keras3_api, keras3_model.Model)
    if importlib.util.find_spec("tf_keras") is None:
        return points
    from tf_keras.src.engine import training, training_v1
    from tf_keras.src.saving import saving_api as tf_keras_api

    pin(TF_KERAS_SAVING_API, "save_model", "load_model", "save_weights", "load_weights")
    # Graph-mode (v1) models override load_weights, then call training.Model's through super().
    return points + _flavour_entry_points("tf_keras", tf_keras_api, training.Model, training_v1.Model)


def install() -> None:
    """Routes Keras' and tf_keras' saving functions and `Model` methods through kerassave_fast.

    Idempotent (a second call changes nothing), undone by `uninstall()`, safe to call from any thread.
    """
    with _LOCK:
        points = _entry_points()  # imports Keras: a pending `install_with_keras` may install in it
        if _UNDO:
            return
        routes: dict[int, Callable] = {}  # id(original function) -> its replacement
        for owner, attribute, ours, model_first in points:
            original = vars(owner)[attribute]
            routed = _route(original, ours, model_first)
            _UNDO.append((owner, attribute, original))
            setattr(owner, attribute, routed)
            if not inspect.isclass(owner):
                routes[id(original)] = routed
        _rebind_aliases(routes)


def _rebind_aliases(routes: dict[int, Callable]) -> None:
    """Points every other module attribute bound to a routed function (`keras.saving.save_model`
    is `keras.src.saving.saving_api.save_model`) at its replacement."""
    originals = {id(original): original for _, _, original in _UNDO}
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".", 1)[0] not in ("keras", "tf_keras"):
            continue
        try:
            attributes = list(vars(module).items())
        except TypeError:
            continue
        for attribute, value in attributes:
            routed = routes.get(id(value))
            if routed is not None and originals.get(id(value)) is value and value is not routed:
                _UNDO.append((module, attribute, value))
                setattr(module, attribute, routed)


_KERAS = ("keras", "tf_keras")


class _InstallAfterKeras:  # an importlib.abc.MetaPathFinder (importing that module slows the start-up)
    """In `sys.meta_path` until Keras or tf_keras is imported: its module's loader then runs
    `install()` once the module has run, and the finder leaves."""

    def find_spec(self, name, path, target=None):
        if name not in _KERAS:
            return None
        for finder in sys.meta_path:  # the spec the finders after this one give
            find_spec = getattr(finder, "find_spec", None)
            spec = None if finder is self or find_spec is None else find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenInstall(spec.loader)
        return spec


class _ThenInstall:
    """A module loader that installs once the module has run (the real loader put back)."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _forget_pending()
        try:
            install()
        except Exception as e:  # a failed routing must not fail the user's `import keras`
            message = f"KERASSAVE_FAST=1: kerassave_fast.install() failed, Keras left as stock: {e!r}"
            warnings.warn(message, stacklevel=2)


def _forget_pending() -> None:
    with _LOCK:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _InstallAfterKeras)]


def install_with_keras() -> None:
    """`install()` now if Keras or tf_keras is imported already, else right after the first of
    them is (what `KERASSAVE_FAST=1` asks at `import kerassave_fast`)."""
    with _LOCK:
        if not any(name in sys.modules for name in _KERAS):
            if not any(isinstance(f, _InstallAfterKeras) for f in sys.meta_path):
                sys.meta_path.insert(0, _InstallAfterKeras())
            return
    install()


def uninstall() -> None:
    """Puts back every function and method `install()` replaced (and forgets a pending
    `install_with_keras`)."""
    _forget_pending()
    with _LOCK:
        while _UNDO:
            owner, attribute, value = _UNDO.pop()
            setattr(owner, attribute, value)
