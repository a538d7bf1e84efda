"""Loads every mutated `.keras` file of a directory in a separate process and reports each outcome.

Run by test_robustness.py: a crash (abort, segfault) here fails that test instead of killing pytest.
Usage: python corpus_worker.py ORIGINAL.keras MUTANTS_DIR  ->  one JSON line per mutant on stdout.
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
    variables = list(model.weights) + list(model.optimizer.variables)
    return [np.atleast_1d(np.asarray(v.numpy())).tobytes() for v in variables]


def main(original: str, mutants: str) -> None:
    warnings.simplefilter("ignore")
    reference = state(ksf.load_model(original))
    for name in sorted(os.listdir(mutants)):
        path = os.path.join(mutants, name)
        try:
            loaded = ksf.load_model(path)
        except Exception as e:  # every refusal is recorded; the test judges its type and message
            outcome = {"file": name, "outcome": "refused", "type": type(e).__name__, "message": str(e)[:300]}
            outcome["mro"] = [c.__name__ for c in type(e).__mro__]
        else:
            same = state(loaded) == reference
            outcome = {"file": name, "outcome": "equal" if same else "DIFFERENT"}
        print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
