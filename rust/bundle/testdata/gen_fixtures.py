"""Writes the TensorFlow-made tensor bundles that rust/bundle's tests compare against.

    python gen_fixtures.py                    # the committed fixtures, into this folder
    python gen_fixtures.py --multi-block DIR  # a bundle whose index spans several SSTable blocks (tests run this)

Each bundle `NAME.index` + `NAME.data-00000-of-00001` comes with `NAME.manifest.tsv`: what TensorFlow's own
reader sees, one line per key: hex(key), dtype enum, shape ("," separated, "-" for a scalar), hex of the
tensor's raw bytes (numeric) or ","-separated hex of its elements (DT_STRING), "*" when not recorded.
"""

import argparse
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))


def write_manifest(prefix, partitioned=()):
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    lines = []
    for key in sorted(shapes, key=lambda k: k.encode()):
        dtype = dtypes[key]
        shape = ",".join(str(d) for d in shapes[key]) or "-"
        value = "*"
        if key not in partitioned:
            tensor = reader.get_tensor(key)
            if dtype == tf.string:
                value = ",".join(bytes(s).hex() for s in np.asarray(tensor, dtype=object).reshape(-1))
            else:
                value = np.ascontiguousarray(tensor).tobytes().hex()
        lines.append(f"{key.encode().hex()}\t{dtype.as_datatype_enum}\t{shape}\t{value}\n")
    with open(prefix + ".manifest.tsv", "w") as f:
        f.writelines(lines)


def checkpoint(out):
    """tf.train.Checkpoint.write: variables created out of key order, so data order != key order."""
    root = tf.train.Checkpoint()
    root.zz_scalar = tf.Variable(np.float32(1.5))
    root.aa_matrix = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
    root.mm_int64 = tf.Variable(np.arange(-2, 3, dtype=np.int64))
    root.bf16 = tf.Variable(tf.constant([1.0, -2.5, 3.0e38], dtype=tf.bfloat16))
    root.empty = tf.Variable(np.zeros((0, 3), np.float32))
    root.text = tf.Variable("hello")
    root.write(os.path.join(out, "checkpoint"))
    write_manifest(os.path.join(out, "checkpoint"))


def many_keys(out):
    """tf.raw_ops.SaveV2: 40+ keys with long shared prefixes (several restart intervals), every fixed-size
    dtype numpy can make, string tensors, a partitioned (sliced) tensor."""
    names, tensors, slices = [], [], []
    kinds = [
        np.float32,
        np.float64,
        np.float16,
        np.int8,
        np.uint8,
        np.int16,
        np.uint16,
        np.int32,
        np.uint32,
        np.int64,
        np.uint64,
        np.complex64,
        np.complex128,
        np.bool_,
    ]
    for i in range(40):
        kind = kinds[i % len(kinds)]
        shape = [(), (3,), (2, 2), (1, 0, 2)][i % 4]
        n = int(np.prod(shape))
        value = (np.arange(n) * (i + 1) % 7).astype(kind).reshape(shape)
        names.append(
            f"model/encoder/layer_with_a_rather_long_name_{i % 7}/sublayer_{i:02d}/kernel/.ATTRIBUTES/VARIABLE_VALUE"
        )
        tensors.append(tf.constant(value))
        slices.append("")
    names.append("strings/vector")
    tensors.append(tf.constant([b"", b"a", b"x" * 200, bytes(range(256))]))
    slices.append("")
    names.append("strings/empty")
    tensors.append(tf.zeros((0,), tf.string))
    slices.append("")
    names.append("strings/matrix")
    tensors.append(tf.constant([[b"ab", b"c"], [b"", b"def"]]))
    slices.append("")
    names.append("bf16/vector")
    tensors.append(tf.constant([0.5, 1.0, -7.0], dtype=tf.bfloat16))
    slices.append("")
    names.append("partitioned/rows_0_2")
    tensors.append(tf.constant([[1.0, 2.0], [3.0, 4.0]]))
    slices.append("4 2 0,2:-")
    prefix = os.path.join(out, "many_keys")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=slices, tensors=tensors)
    # The slice's own key (an ordered-code encoding) is not listed; the full tensor lacks rows 2..4.
    write_manifest(prefix, partitioned={"partitioned/rows_0_2"})


def saved_model(out):
    """tf.saved_model.save: the variables/ bundle of a SavedModel."""
    module = tf.Module()
    module.dense_kernel = tf.Variable(np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4))
    module.dense_bias = tf.Variable(np.zeros(4, np.float32))
    module.step = tf.Variable(np.int64(7))
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(module, tmp)
        for name in ("variables.index", "variables.data-00000-of-00001"):
            shutil.copy(os.path.join(tmp, "variables", name), os.path.join(out, "saved_model_" + name))
    write_manifest(os.path.join(out, "saved_model_variables"))


def multi_block(out):
    """An index larger than one 256 KiB block, plus one entry over 2 x block_size (flushed on its own)."""
    # The varying part first, so prefix compression leaves ~110 bytes a key: two full data blocks.
    names = [f"layer_{i:05d}/{'deep/' * 12}kernel/.ATTRIBUTES/VARIABLE_VALUE" for i in range(4000)]
    names.append("z/" + "k" * (600 * 1024))
    tensors = [tf.constant(np.int8(i % 100)) for i in range(len(names))]
    prefix = os.path.join(out, "multi_block")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
    write_manifest(prefix)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multi-block", metavar="DIR", help="write only the multi-block bundle, into DIR")
    args = parser.parse_args()
    if args.multi_block:
        multi_block(args.multi_block)
        return
    checkpoint(HERE)
    many_keys(HERE)
    saved_model(HERE)
    print(tf.__version__)


if __name__ == "__main__":
    main()
