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

Routing (KSF_ROUTE=1): `kerassave_fast.install()`, once for the session, exactly as a user would
adopt kerassave_fast without changing code (python/kerassave_fast/install.py says what it routes:
Keras 3's and tf_keras' saving functions and their aliases, the `Model` methods, and graph-mode
(v1) models' `load_weights`). The terminal summary says whether it was in effect.

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

import inspect
import os
import pathlib
import sys

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


_SUITE = None


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

    import kerassave_fast

    if not flags.FLAGS.is_parsed():  # as tf.test.main() would, but not from pytest's own argv
        flags.FLAGS([sys.argv[0]], known_only=True)

    if _SUITE == "tf_keras":
        import tf_keras

        if "site-packages" not in (tf_keras.__file__ or ""):
            raise pytest.UsageError(f"tf_keras resolves to {tf_keras.__file__}, not the installed wheel")
    if _routing():
        kerassave_fast.install()


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
    import kerassave_fast

    terminalreporter.section("kerassave_fast routing")
    terminalreporter.write_line(f"kerassave_fast.install() in effect: {kerassave_fast.installed()}")
