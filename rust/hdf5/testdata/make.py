"""Writes keras_like.h5, the fixture of rust/hdf5/tests.rs: `python make.py` (h5py, ml_dtypes)."""

import h5py
import ml_dtypes
import numpy as np

with h5py.File("keras_like.h5", "w") as f:
    f.attrs["model_config"] = '{"class_name": "Sequential"}'
    dense = f.create_group("layers/dense/vars")
    dense["0"] = np.arange(12, dtype="float32").reshape(3, 4)
    dense["1"] = np.arange(4, dtype="float32")
    low = f.create_group("layers/low/vars")
    ds = low.create_dataset("0", data=np.arange(6).astype(ml_dtypes.bfloat16))
    ds.attrs["dtype"] = "bfloat16"
    low.create_dataset("1", data=np.ones((16, 16), "float32"), compression="gzip", shuffle=True)
    low["2"] = h5py.SoftLink("/layers/dense/vars/0")
    optimizer = f.create_group("optimizer/vars")
    optimizer["0"] = np.int64(7)
    optimizer["1"] = np.arange(3, dtype=">f4")  # big-endian: left to h5py
    legacy = f.create_group("legacy")
    legacy["bf16"] = np.arange(5).astype(ml_dtypes.bfloat16)  # untagged 2-byte opaque, no attribute
    legacy["when"] = np.arange(2).astype("M8[s]").astype(h5py.opaque_dtype(np.dtype("M8[s]")))  # tagged
