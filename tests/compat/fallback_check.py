"""For a Keras release that lacks a private piece the fast paths use (keras3/hooks.py): every
Keras 3 save and load goes to stock, with exactly one warning naming what is missing, and the
files round-trip bitwise. Exits 0 when so. Run by tests/compat/run.sh."""

import os
import sys
import tempfile
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import kerassave_fast as ksf
from kerassave_fast.keras3 import hooks


def main() -> int:
    missing = hooks.missing()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((8, 4)), np.ones((8, 3)), verbose=0)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ksf.save_model(model, os.path.join(d, "m.keras"))
        loaded = ksf.load_model(os.path.join(d, "m.keras"))
        ksf.save_weights(model, os.path.join(d, "m.weights.h5"))
        ksf.load_weights(loaded, os.path.join(d, "m.weights.h5"))
    ours = [str(w.message) for w in caught if str(w.message).startswith("kerassave_fast:")]
    same = all(np.array_equal(a, b) for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True))
    ok = bool(missing) and len(ours) == 1 and all(m in ours[0] for m in missing) and same
    verdict = "ok" if ok else "WRONG"
    print(f"stock fallback {verdict}: {len(ours)} warning(s), weights equal: {same}; missing: {missing}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
