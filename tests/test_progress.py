"""`progress=`: a bar in bytes on stderr for saves and loads (after a second; tests show it at once)."""

from __future__ import annotations

import pytest
import tqdm

import kerassave_fast as ksf
from conftest import MODELS
from kerassave_fast import progress
from kerassave_fast._core import tensor_bytes_moved


@pytest.fixture
def bars(monkeypatch):
    """Every bar shown: (description, final count, total)."""
    monkeypatch.setattr(progress, "_SHOW_AFTER_SECONDS", 0)
    shown = []
    close = tqdm.tqdm.close

    def recording_close(self):
        if self.total is not None and not self.disable:
            shown.append((self.desc, self.n, self.total))
        close(self)

    monkeypatch.setattr(tqdm.tqdm, "close", recording_close)
    return shown


@pytest.mark.parametrize("filename", ["m.keras", "m.h5", "m.weights.h5"])
def test_bars_count_to_the_bytes_saved_and_loaded(tmp_path, bars, capsys, filename):
    model = MODELS["optimizer_adam"]()
    path = tmp_path / filename
    moved = tensor_bytes_moved()
    if filename.endswith(".weights.h5"):
        ksf.save_weights(model, path, progress=True)
        ksf.load_weights(model, path, progress=True)
    else:
        ksf.save_model(model, path, progress=True)
        ksf.load_model(path, progress=True)
    expected = sum(v.numpy().nbytes for v in model.weights + model.optimizer.variables)
    assert tensor_bytes_moved() - moved >= 2 * expected  # what the bars were polling: written, then read
    assert bars == [(f"saving {filename}", expected, expected), (f"loading {filename}", *(2 * [path.stat().st_size]))]
    assert f"saving {filename}" in capsys.readouterr().err


def test_background_saves_show_a_bar_only_when_asked(tmp_path, bars):
    model = MODELS["seed_example"]()
    ksf.save_model(model, tmp_path / "a.keras", blocking=False).result()
    assert bars == []
    ksf.save_model(model, tmp_path / "b.keras", blocking=False, progress=True).result()
    assert [desc for desc, *_ in bars] == ["saving b.keras"]


def test_no_bar_unless_a_terminal_or_asked(tmp_path, bars, capsys, monkeypatch):
    model = MODELS["seed_example"]()
    ksf.save_model(model, tmp_path / "m.keras")  # stderr is captured here: not a terminal
    ksf.save_model(model, tmp_path / "m.keras", progress=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    monkeypatch.setenv("CI", "true")
    ksf.load_model(tmp_path / "m.keras")
    assert bars == [] and capsys.readouterr().err == ""
    monkeypatch.delenv("CI")
    assert progress.wanted(None)


def test_progress_must_be_a_bool_or_none(tmp_path):
    with pytest.raises(ValueError, match="`progress` must be True, False or None"):
        ksf.save_model(MODELS["seed_example"](), tmp_path / "m.keras", progress="yes")
