"""Runs stock Keras' own saving tests, optionally with the saving API routed through kerassave_fast.

Run one suite per pytest process (see README.md here; compare.py runs both modes and diffs them):

    .venv/bin/python -m pytest tests/stock_suites/keras3              # stock
    KSF_ROUTE=1 .venv/bin/python -m pytest tests/stock_suites/keras3  # routed through ours
    .venv/bin/python -m pytest tests/stock_suites/tf_keras            # (and KSF_ROUTE=1 ...)

Collection. These suites are not part of `make test`: this conftest ignores everything under
tests/stock_suites/ unless pytest runs with tests/stock_suites/pytest.ini as its config (which it
does when given a path under tests/stock_suites/) or KSF_STOCK_SUITES=1 is set. That pytest.ini
also replaces the repo's `filterwarnings = error`: stock's tests run with pytest's default warning
handling, as they do upstream.

Flavour. `kerassave_fast.load_model` picks tf_keras or Keras 3 by TF_USE_LEGACY_KERAS, as `tf.keras`
does, so the suite decides it: TF_USE_LEGACY_KERAS=1 for tf_keras/, unset for keras3/ (set here,
before TensorFlow is imported, in both modes). Hence one suite per process. Both modes import the
same modules up front (tensorflow, keras, kerassave_fast, and tf_keras for its suite), so the only
difference between a stock and a routed run is the routing.

Routing (KSF_ROUTE=1), installed once for the session as a user's `install()` would. The
user-facing entry points are replaced by wrappers that call kerassave_fast:

  * Keras 3: `keras.src.saving.saving_api.{save_model,load_model,save_weights,load_weights}` and
    every module attribute under `keras.*` bound to those functions (`keras.saving.*`,
    `keras.models.*`, `keras._tf_keras.keras.*`, ...); `keras.Model.{save,save_weights,load_weights}`.
    The suite calls `saving_api.save_model(...)` directly, so the saving_api module itself is routed.
  * tf_keras: the same four functions of `tf_keras.src.saving.saving_api` and their bindings under
    `tf_keras.*` (`tf_keras.saving.*`, `tf_keras.models.*`, ...); `tf_keras.Model.{save,
    save_weights,load_weights}` (tf_keras.src.engine.training) and `training_v1.Model.load_weights`,
    which the graph-mode (v1) models that the `run_all_keras_modes` tests build resolve to instead.

A wrapper binds its arguments to the ORIGINAL's signature (so a bad call raises stock's TypeError)
and passes kerassave_fast only what the caller passed, by keyword (`model`/`self` positionally):
stock's keyword arguments (`by_name`, `options`, `zipped`, `objects_to_skip`, ...) reach ours
unchanged, and positional extras land on stock's parameter names (Keras 3's 4th positional of
`save_model` is `zipped`, not ours `save_format`).

Recursion. kerassave_fast delegates to stock through the very names routed here (api.py calls
`tf_keras.saving.save_model`, `model.save_weights`, `model.load_weights`, `keras.saving.save_model`,
`keras.saving.load_model`, ... looked up at call time). Rather than patch those names back (they
are the user-facing ones), each wrapper keeps the original it replaced and a thread-local depth:
the outermost call goes to kerassave_fast; any routed name called while a kerassave_fast call is
running (its delegation, and stock code that delegation runs, e.g. tf_keras `Model.save` ->
`saving_api.save_model`) goes straight to the original. So ours always reaches stock's originals,
and stock's internals run as stock.

Flags. Upstream runs each file through `tf.test.main()`, which parses absl flags from the test
binary's argv; under pytest TensorFlow would parse pytest's argv on first flag access and fail on
`-q`, so they are parsed here from the program name alone.

Stdin. Upstream runs these tests under bazel with stdin at /dev/null; some check that an
`overwrite=False` save prompts by expecting `input()`'s EOFError. pytest's capture would raise
OSError instead, so each test runs with `sys.stdin` opened on os.devnull (not a terminal).

Output capture. Tests that use `captureWritesToStream(sys.stderr)` read what TensorFlow's C++
side (`tf.print`) writes to file descriptor 2, which pytest's fd capture redirects elsewhere;
those tests (found by that name in their source) run with pytest's capture suspended.

The terminal summary lists how many calls were routed per entry point and how many nested calls
were handed back to stock, so a routed run that routed nothing is visible.
"""

from __future__ import annotations

import collections
import functools
import inspect
import os
import pathlib
import sys
import threading

import pytest

HERE = pathlib.Path(__file__).resolve().parent
SUITES = ("keras3", "tf_keras")


def _enabled(config) -> bool:
    inipath = getattr(config, "inipath", None)
    return os.environ.get("KSF_STOCK_SUITES") == "1" or (inipath is not None and inipath.parent == HERE)


def _routing() -> bool:
    return os.environ.get("KSF_ROUTE") in ("1", "true", "True")


def pytest_ignore_collect(collection_path, config):
    if not _enabled(config) and HERE in collection_path.resolve().parents:
        return True
    return None


def _suites_of(config) -> set[str]:
    suites = set()
    for arg in config.args:
        path = pathlib.Path(str(arg).split("::", 1)[0]).resolve()
        if path == HERE or path in HERE.parents:
            suites.update(SUITES)
        for suite in SUITES:
            if path == HERE / suite or HERE / suite in path.parents:
                suites.add(suite)
    return suites


class _Router:
    """The patches of one session, their originals, and call counts."""

    def __init__(self):
        self.state = threading.local()
        self.routed = collections.Counter()
        self.handed_back = collections.Counter()
        self.functions = {}  # original function -> (label, wrapper)
        self.bindings = collections.Counter()  # label -> module attributes rebound

    def depth(self) -> int:
        return getattr(self.state, "depth", 0)

    def wrap(self, label, original, ours, model_first: bool):
        sig = inspect.signature(original)
        params = list(sig.parameters.values())
        first = params[0].name
        var_kw = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if self.depth():
                self.handed_back[label] += 1
                return original(*args, **kwargs)
            explicit = dict(sig.bind(*args, **kwargs).arguments)
            if var_kw is not None:
                explicit.update(explicit.pop(var_kw, {}))
            self.routed[label] += 1
            self.state.depth = 1
            try:
                if model_first:
                    return ours(explicit.pop(first), **explicit)
                return ours(**explicit)
            finally:
                self.state.depth = 0

        wrapper.__ksf_original__ = original
        return wrapper

    def route_function(self, label, module, name, ours, model_first=True):
        original = getattr(module, name)
        original = getattr(original, "__ksf_original__", original)
        if original not in self.functions:
            self.functions[original] = (label, self.wrap(label, original, ours, model_first))
        self.rebind()

    def route_method(self, label, cls, name, ours):
        original = cls.__dict__[name]
        if hasattr(original, "__ksf_original__"):
            return
        setattr(cls, name, self.wrap(label, original, ours, model_first=True))
        self.bindings[label] += 1

    def rebind(self, prefixes=("keras", "tf_keras")):
        """Points every module attribute under `prefixes` bound to a routed original at its wrapper."""
        for modname, module in list(sys.modules.items()):
            if module is None or modname.split(".", 1)[0] not in prefixes:
                continue
            try:
                items = list(vars(module).items())
            except TypeError:
                continue
            for attr, value in items:
                try:
                    hit = self.functions.get(value)
                except TypeError:  # unhashable
                    continue
                if hit is not None:
                    setattr(module, attr, hit[1])
                    self.bindings[hit[0]] += 1


_ROUTER = _Router()
_SUITE = None


def _install(suite: str) -> None:
    import kerassave_fast as ksf

    r = _ROUTER
    from keras.src.models import model as k3_model
    from keras.src.saving import saving_api as k3_api

    for name in ("save_model", "load_model", "save_weights", "load_weights"):
        r.route_function(f"keras.saving.{name}", k3_api, name, getattr(ksf, name), model_first=name != "load_model")
    r.route_method("keras.Model.save", k3_model.Model, "save", ksf.save_model)
    r.route_method("keras.Model.save_weights", k3_model.Model, "save_weights", ksf.save_weights)
    r.route_method("keras.Model.load_weights", k3_model.Model, "load_weights", ksf.load_weights)
    if suite != "tf_keras":
        return
    from tf_keras.src.engine import training, training_v1
    from tf_keras.src.saving import saving_api as tk_api

    for name in ("save_model", "load_model", "save_weights", "load_weights"):
        r.route_function(f"tf_keras.saving.{name}", tk_api, name, getattr(ksf, name), model_first=name != "load_model")
    r.route_method("tf_keras.Model.save", training.Model, "save", ksf.save_model)
    r.route_method("tf_keras.Model.save_weights", training.Model, "save_weights", ksf.save_weights)
    r.route_method("tf_keras.Model.load_weights", training.Model, "load_weights", ksf.load_weights)
    r.route_method("tf_keras training_v1.Model.load_weights", training_v1.Model, "load_weights", ksf.load_weights)


def pytest_configure(config):
    global _SUITE
    if not _enabled(config):
        return
    suites = _suites_of(config)
    if len(suites) != 1:
        raise pytest.UsageError(
            "run one stock suite per pytest process (they need different TF_USE_LEGACY_KERAS): "
            "give a path under tests/stock_suites/keras3 or tests/stock_suites/tf_keras"
        )
    (_SUITE,) = suites
    if _SUITE == "tf_keras":
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
    else:
        os.environ.pop("TF_USE_LEGACY_KERAS", None)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        raise pytest.UsageError("tensorflow was imported before tests/stock_suites/conftest.py set TF_USE_LEGACY_KERAS")

    import keras  # noqa: F401
    import tensorflow  # noqa: F401
    from absl import flags

    import kerassave_fast  # noqa: F401

    if not flags.FLAGS.is_parsed():  # as tf.test.main() would, but not from pytest's own argv
        flags.FLAGS([sys.argv[0]], known_only=True)

    if _SUITE == "tf_keras":
        import tf_keras

        if "site-packages" not in (tf_keras.__file__ or ""):
            raise pytest.UsageError(f"tf_keras resolves to {tf_keras.__file__}, not the installed wheel")
    if _routing():
        _install(_SUITE)


@pytest.fixture(autouse=True)
def _stdin_at_devnull(monkeypatch):
    with open(os.devnull) as devnull:
        monkeypatch.setattr(sys, "stdin", devnull)
        yield


def _writes_to_real_stream(item) -> bool:
    try:
        return "captureWritesToStream" in inspect.getsource(item.function)
    except (AttributeError, OSError, TypeError):
        return False


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_call(item):
    capman = item.config.pluginmanager.getplugin("capturemanager")
    if _SUITE is None or capman is None or not _writes_to_real_stream(item):
        return (yield)
    with capman.global_and_fixture_disabled():
        return (yield)


def pytest_collection_finish(session):
    if _SUITE is not None and _routing():
        _ROUTER.rebind()  # modules the test files imported after configure


def pytest_report_header(config):
    if _SUITE is None:
        return None
    import kerassave_fast

    mode = "ROUTED through kerassave_fast" if _routing() else "stock (no routing; KSF_ROUTE=1 routes)"
    return [
        f"stock suite: {_SUITE}; {mode}",
        f"TF_USE_LEGACY_KERAS={os.environ.get('TF_USE_LEGACY_KERAS')!s}; kerassave_fast from {kerassave_fast.__file__}",
    ]


def pytest_terminal_summary(terminalreporter):
    if _SUITE is None or not _routing():
        return
    tr = terminalreporter
    tr.section("kerassave_fast routing")
    for label in sorted(set(_ROUTER.bindings) | set(_ROUTER.routed)):
        tr.write_line(
            f"{label}: {_ROUTER.bindings[label]} binding(s) patched, {_ROUTER.routed[label]} call(s) routed to "
            f"kerassave_fast, {_ROUTER.handed_back[label]} nested call(s) handed to stock"
        )
