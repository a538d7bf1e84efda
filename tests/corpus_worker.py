"""Loads every mutated file (`.keras`, `.h5`) of a directory in a separate process and reports each outcome.

Run by test_robustness.py: a crash (abort, segfault) here fails that test instead of killing pytest,
and a load that never returns is seen by the test's per-file timeout (each load is announced first).
Usage: python corpus_worker.py ORIGINAL MUTANTS_DIR [AFTER]  ->  JSON lines on stdout: {"start": file}
then the outcome, for each mutant in name order (those after AFTER only, when given).
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


def main(original: str, mutants: str, after: str = "") -> None:
    warnings.simplefilter("ignore")
    model = ksf.load_model(original)
    reference, reference_weights = state(model), weights(model)
    for name in sorted(n for n in os.listdir(mutants) if n > after):
        print(json.dumps({"start": name}), flush=True)
        path = os.path.join(mutants, name)
        try:
            loaded = ksf.load_model(path)
        except Exception as e:  # every refusal is recorded; the test judges its type and message
            outcome = {"file": name, "outcome": "refused", "type": type(e).__name__, "message": str(e)[:300]}
            outcome["mro"] = [c.__name__ for c in type(e).__mro__]
            outcome["notes"] = [str(n) for n in getattr(e, "__notes__", [])]
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
    main(*sys.argv[1:4])
