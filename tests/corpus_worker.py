"""Loads every mutated file of a directory in a separate process and reports each outcome.

Run by test_robustness.py: a crash (abort, segfault) here fails that test instead of killing pytest,
and a load that never returns is seen by the test's per-file timeout (each load is announced first).
Usage: python corpus_worker.py ORIGINAL MUTANTS_DIR MODE [AFTER]  ->  JSON lines on stdout:
{"start": file} then the outcome, for each mutant in name order (those after AFTER only, when given).
MODE "model": `load_model` of each mutant (`.keras`, `.h5`), compared with ORIGINAL's state.
MODE "weights": `load_weights` of each mutant (a weights file, or a directory holding a TF
checkpoint `ckpt`) into ORIGINAL's model, whose weights are first set to other values.
The Keras flavour is TensorFlow's: tf_keras when TF_USE_LEGACY_KERAS=1.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

import kerassave_fast as ksf


def state(model) -> list[bytes]:
    optimizer = getattr(model, "optimizer", None)
    variables = list(model.weights) + (list(optimizer.variables) if optimizer is not None else [])
    return [np.atleast_1d(np.asarray(v.numpy())).tobytes() for v in variables]


def weights(model) -> list[bytes]:
    return [np.atleast_1d(np.asarray(v.numpy())).tobytes() for v in model.weights]


def refusal(name: str, e: Exception) -> dict:
    """Every refusal is recorded; the test judges its type and message."""
    outcome = {"file": name, "outcome": "refused", "type": type(e).__name__, "message": str(e)[:300]}
    outcome["mro"] = [c.__name__ for c in type(e).__mro__]
    outcome["notes"] = [str(n) for n in getattr(e, "__notes__", [])]
    return outcome


def load_weights_of(model, mutants: str, names: list[str]) -> None:
    """Each mutant's weights loaded into `model`, reset first to values no file holds, so that a
    variable the load skips shows as different."""
    reference = weights(model)
    other = [np.full_like(np.asarray(w), 3) for w in model.get_weights()]
    for name in names:
        print(json.dumps({"start": name}), flush=True)
        path = os.path.join(mutants, name)
        path = os.path.join(path, "ckpt") if os.path.isdir(path) else path
        model.set_weights(other)
        try:
            ksf.load_weights(model, path)
        except Exception as e:
            outcome = refusal(name, e)
        else:
            outcome = {"file": name, "outcome": "equal" if weights(model) == reference else "DIFFERENT"}
        print(json.dumps(outcome), flush=True)


def main(original: str, mutants: str, mode: str, after: str = "") -> None:
    warnings.simplefilter("ignore")
    model = ksf.load_model(original)
    reference, reference_weights = state(model), weights(model)
    names = sorted(n for n in os.listdir(mutants) if n > after)
    if mode == "weights":
        return load_weights_of(model, mutants, names)
    for name in names:
        print(json.dumps({"start": name}), flush=True)
        path = os.path.join(mutants, name)
        try:
            loaded = ksf.load_model(path)
        except Exception as e:
            outcome = refusal(name, e)
        else:
            if getattr(loaded, "optimizer", None) is None:
                # A damaged training config: stock too loads the weights alone, uncompiled.
                same = weights(loaded) == reference_weights
                outcome = {"file": name, "outcome": "weights equal, not compiled" if same else "DIFFERENT"}
            elif state(loaded) == reference:
                outcome = {"file": name, "outcome": "equal"}
            else:
                # With the weights equal, only the optimizer's state can differ: a `.h5` whose
                # optimizer group lost its name loads with a fresh optimizer, in stock too.
                same = weights(loaded) == reference_weights
                outcome = {"file": name, "outcome": "weights equal, optimizer state not" if same else "DIFFERENT"}
        print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
