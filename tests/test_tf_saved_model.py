"""tf_keras SavedModels (`save_model(model, dir, save_format="tf")`): TensorFlow writes the graph, the
Rust bundle writer writes `variables/`; stock tf_keras / TensorFlow are the oracle."""

from __future__ import annotations

import contextlib
import filecmp
import functools
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import kerassave_fast as ksf

tf_keras = pytest.importorskip("tf_keras")

from tf_keras_models import MODELS, batch, compiled, dense_adam, state, trained  # noqa: E402

VARIABLES = ("variables/variables.index", "variables/variables.data-00000-of-00001")


@contextlib.contextmanager
def _stock_forbidden(owner, name: str):
    """Fails if stock's `owner.name` runs (the Rust core must do that work)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"stock's {name} ran")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(owner, name, refuse)
        yield


def _stock_checkpoint_forbidden():
    """TensorFlow's checkpoint writer must not save the variables."""
    from tensorflow.python.checkpoint import checkpoint

    return _stock_forbidden(checkpoint.TrackableSaver, "save")


def _stock_restore_forbidden():
    """TensorFlow's `RestoreV2` must not read the tensors."""
    from tensorflow.python.checkpoint import functional_saver

    return _stock_forbidden(functional_saver.io_ops, "restore_v2")


def _next_steps_equal(reference, model, step) -> None:
    """One training step of each on the same batch leaves bitwise the same weights."""
    reference.train_on_batch(*step)
    model.train_on_batch(*step)
    for a, b in zip(reference.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)


def _with_metrics(make):
    model = compiled(make)
    model.compile(optimizer=model.optimizer, loss="mse", metrics=["mae"])
    model.train_on_batch(*batch(model))
    return model


@pytest.fixture(scope="module", params=MODELS, ids=lambda f: f.__name__)
def saved(request, tmp_path_factory):
    """A trained model (with a metric, whose variables only the SavedModel's checkpoint holds) and the
    SavedModels stock and we wrote of it."""
    model = _with_metrics(request.param)
    base = tmp_path_factory.mktemp(request.param.__name__)
    model.save(str(base / "stock"), save_format="tf")
    with _stock_checkpoint_forbidden():
        assert ksf.save_model(model, base / "ours") is None
    return model, base / "stock", base / "ours"


def test_variables_are_byte_identical_to_stocks(saved):
    _, stock_dir, ours_dir = saved
    for name in (*VARIABLES, "keras_metadata.pb"):
        assert filecmp.cmp(stock_dir / name, ours_dir / name, shallow=False), name
    assert sorted(os.listdir(ours_dir)) == sorted(os.listdir(stock_dir))
    assert sorted(os.listdir(ours_dir / "variables")) == sorted(os.listdir(stock_dir / "variables"))


def test_object_graph_in_the_bundle_is_the_saved_models(saved):
    """The checkpoint's object graph names the SavedModel's nodes (TensorFlow matches them on load)."""
    from tensorflow.core.protobuf import saved_model_pb2, trackable_object_graph_pb2

    _, _, ours_dir = saved
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(
        tf.train.load_checkpoint(str(ours_dir / "variables/variables")).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")
    )
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((ours_dir / "saved_model.pb").read_bytes())
    nodes = proto.meta_graphs[0].object_graph_def.nodes
    assert len(graph.nodes) == len(nodes)
    for ours, saved_node in zip(graph.nodes, nodes, strict=True):
        assert [(c.node_id, c.local_name) for c in ours.children] == [
            (c.node_id, c.local_name) for c in saved_node.children
        ]


def test_tensorflow_serves_ours(saved):
    model, _, ours_dir = saved
    loaded = tf.saved_model.load(str(ours_dir))
    serve = loaded.signatures["serving_default"]
    x, _ = batch(model, seed=3)
    (out,) = serve(tf.constant(x)).values()
    np.testing.assert_array_equal(out.numpy(), model(x, training=False).numpy())


def test_stock_load_model_restores_ours_and_training_goes_on_identically(saved, tmp_path):
    model, _, ours_dir = saved
    loaded = tf_keras.models.load_model(str(ours_dir))
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    # Stock's load_model gives a fresh optimizer; the bundle holds the saved one (FORMATS.md).
    loaded.load_weights(str(ours_dir / "variables" / "variables"))
    reference = tf_keras.models.load_model(str(saved[1]))
    reference.load_weights(str(saved[1] / "variables" / "variables"))
    _next_steps_equal(reference, loaded, batch(model, seed=4))


def test_custom_signature_and_options(tmp_path):
    model = trained(dense_adam)

    @tf.function(input_signature=[tf.TensorSpec((None, 5), tf.float32)])
    def doubled(x):
        return {"y": model(x) * 2.0}

    options = tf.saved_model.SaveOptions(save_debug_info=True)
    with _stock_checkpoint_forbidden():
        ksf.save_model(model, tmp_path / "sm", signatures={"doubled": doubled}, options=options)
    assert (tmp_path / "sm" / "debug").is_dir()
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    x, _ = batch(model, seed=5)
    np.testing.assert_array_equal(loaded.signatures["doubled"](tf.constant(x))["y"].numpy(), model(x).numpy() * 2)


def test_include_optimizer_false_and_save_traces_false(tmp_path):
    model = _with_metrics(dense_adam)
    model.save(str(tmp_path / "stock"), save_format="tf", include_optimizer=False, save_traces=False)
    ksf.save_model(model, tmp_path / "ours", include_optimizer=False, save_traces=False)
    for name in VARIABLES:
        assert filecmp.cmp(tmp_path / "stock" / name, tmp_path / "ours" / name, shallow=False), name
    assert model.optimizer is not None and model._lookup_dependency("optimizer") is model.optimizer
    reader = tf.train.load_checkpoint(str(tmp_path / "ours" / "variables" / "variables"))
    assert not any(k.startswith("optimizer") for k in reader.get_variable_to_shape_map())
    loaded = tf_keras.models.load_model(str(tmp_path / "ours"))
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_resave_replaces_the_directory_and_keeps_foreign_ones(tmp_path):
    model = trained(dense_adam)
    target = tmp_path / "sm"
    ksf.save_model(model, target)
    (target / "variables" / "variables.data-00000-of-00002").write_bytes(b"stale shard")
    (target / "assets.extra").mkdir()  # TF Serving's warm-up requests: stock's save leaves them
    (target / "assets.extra" / "tf_serving_warmup_requests").write_bytes(b"requests")
    model.train_on_batch(*batch(model, seed=6))
    (target / "assets" / "labels.txt").write_text("cat")  # a user's file inside an entry the save writes
    (target / "variables" / "README").write_text("mine")
    ksf.save_model(model, target)
    assert not (target / "variables" / "variables.data-00000-of-00002").exists()
    assert (target / "assets.extra" / "tf_serving_warmup_requests").read_bytes() == b"requests"
    assert (target / "assets" / "labels.txt").read_text() == "cat"
    assert (target / "variables" / "README").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["sm"]  # nothing left beside it
    loaded = tf_keras.models.load_model(str(target))
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # A directory holding other things is written into, as stock does, never replaced.
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    ksf.save_model(model, tmp_path / "project")
    assert (tmp_path / "project" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "project" / "saved_model.pb").exists()


@pytest.mark.parametrize("loader", ["stock", "ours"])
def test_a_revived_model_saved_over_its_own_directory_keeps_its_file_assets(tmp_path, loader):
    """A model loaded from a SavedModel no longer tracks its vocabulary file, which the graph still
    names in the directory's `assets/`: saved back over it, stock keeps the file (it writes in
    place), and so must we."""
    (tmp_path / "vocab.txt").write_text("a\nb\nc\n")
    inputs = tf_keras.Input((1,), dtype=tf.string)
    indices = tf_keras.layers.StringLookup(vocabulary=str(tmp_path / "vocab.txt"))(inputs)
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(1)(tf.cast(indices, tf.float32)))
    target = str(tmp_path / "sm")
    tf_keras.models.save_model(model, target, save_format="tf")
    load = tf_keras.models.load_model if loader == "stock" else functools.partial(ksf.load_model_as, "tf_keras")
    revived = load(target)
    ksf.save_model(revived, target, save_format="tf")
    assert (tmp_path / "sm" / "assets" / "vocab.txt").read_text() == "a\nb\nc\n"
    words = tf.constant([["b"], ["z"]])
    np.testing.assert_array_equal(tf_keras.models.load_model(target)(words), model(words))


_CARRY_OVER = """
import os, sys
from kerassave_fast.formats.saved_model import _carry_over_unwritten
old, new = sys.argv[1], sys.argv[2]
try:
    _carry_over_unwritten(old, new)
except PermissionError:
    sys.exit("refused")
print(oct(os.stat(os.path.join(new, "assets", "ro")).st_mode & 0o777), os.listdir(os.path.join(new, "assets", "ro")))
"""


@pytest.mark.parametrize("mode", [0o555, 0o300])
def test_the_previous_directory_s_read_only_or_unlistable_directories_are_carried_whole(tmp_path, mode):
    """Run without root's right to ignore permissions: a read-only directory is filled before its
    mode is copied; one that cannot be listed fails the save rather than losing its files."""
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "assets" / "ro").mkdir(parents=True)
    (old / "assets" / "ro" / "vocab.txt").write_text("a")
    (new / "assets").mkdir(parents=True)
    os.chmod(old / "assets" / "ro", mode)
    command = [sys.executable, "-c", _CARRY_OVER, str(old), str(new)]
    if os.geteuid() == 0:  # root ignores permissions: drop that power for the check
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv (util-linux): permissions cannot be checked")
        command = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", *command]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    os.chmod(old / "assets" / "ro", 0o755)
    if mode == 0o555:
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split() == ["0o555", "['vocab.txt']"]
    else:
        assert run.returncode == 1 and run.stderr.strip().endswith("refused"), run.stderr[-2000:]


def test_a_failed_save_leaves_the_previous_saved_model(tmp_path, monkeypatch):
    model = trained(dense_adam)
    target = tmp_path / "sm"
    ksf.save_model(model, target)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    from tensorflow.python.saved_model import fingerprinting_utils

    def fail(export_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fingerprinting_utils, "write_fingerprint", fail)
    model.train_on_batch(*batch(model, seed=7))
    with pytest.raises(OSError, match="No space"):
        ksf.save_model(model, target)
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["sm"]


def test_overwrite_false_refuses_without_an_answer(tmp_path, monkeypatch):
    model = trained(dense_adam)
    target = tmp_path / "sm"
    target.mkdir()
    (target / "saved_model.pb").write_bytes(b"previous")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(ksf.OverwriteRefused):
        ksf.save_model(model, target, overwrite=False)
    assert (target / "saved_model.pb").read_bytes() == b"previous"


def test_variables_written_while_tensorflow_traces_match_a_model_changed_meanwhile(tmp_path, monkeypatch):
    """If a variable changes between the early write and the end of tracing, the bundle holds the
    value at the end of tracing, as stock's."""
    from tensorflow.python.saved_model import save as save_lib

    model = trained(dense_adam)
    build = save_lib._build_meta_graph

    def build_then_assign(*args, **kwargs):
        result = build(*args, **kwargs)
        model.layers[0].kernel.assign_add(tf.ones_like(model.layers[0].kernel))
        return result

    monkeypatch.setattr(save_lib, "_build_meta_graph", build_then_assign)
    ksf.save_model(model, tmp_path / "sm")
    reader = tf.train.load_checkpoint(str(tmp_path / "sm" / "variables" / "variables"))
    kernel = reader.get_tensor("layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE")
    np.testing.assert_array_equal(kernel, model.layers[0].kernel.numpy())


def test_tensors_the_fast_path_cannot_write_go_to_tensorflows_writer(tmp_path, monkeypatch):
    from kerassave_fast.formats import saved_model as saved_model_format
    from kerassave_fast.tf_keras import checkpoint as tf_checkpoint

    model = trained(dense_adam)
    model.save(str(tmp_path / "stock"), save_format="tf")

    def not_fast(saver):
        raise tf_checkpoint.NotFast("for the test")

    monkeypatch.setattr(saved_model_format, "checkpoint_tensors", not_fast)
    ksf.save_model(model, tmp_path / "ours")
    for name in VARIABLES:
        assert filecmp.cmp(tmp_path / "stock" / name, tmp_path / "ours" / name, shallow=False), name


# --- load_model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["stock", "ours"])
def test_load_model_restores_weights_and_the_optimizer_and_training_goes_on_identically(saved, writer):
    """Stock compiles a fresh optimizer and drops the saved one; ours holds the saved state at once, so
    the next step equals the original model's next step, bitwise."""
    model, stock_dir, ours_dir = saved
    original = tf_keras.models.clone_model(model)  # the saved state, kept apart from `model`
    original.set_weights(model.get_weights())
    with _stock_restore_forbidden():
        loaded = ksf.load_model_as("tf_keras", stock_dir if writer == "stock" else ours_dir)
    assert type(loaded.optimizer) is type(model.optimizer)
    weights, optimizer_variables = state(model)
    loaded_weights, loaded_optimizer_variables = state(loaded)
    assert len(loaded_optimizer_variables) == len(optimizer_variables) > 1
    for a, b in zip(optimizer_variables, loaded_optimizer_variables, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(weights, loaded_weights, strict=True):
        np.testing.assert_array_equal(a, b)
    # The reference: stock's load, then the optimizer restored from the bundle (FORMATS.md).
    reference = tf_keras.models.load_model(str(stock_dir))
    reference.load_weights(str(stock_dir / "variables" / "variables"))
    step = batch(model, seed=4)
    assert loaded.train_on_batch(*step) == reference.train_on_batch(*step)
    for a, b in zip(reference.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    for a, b in zip(reference.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)


def test_load_model_without_compiling_gives_stocks_restored_optimizer(saved):
    model, stock_dir, _ = saved
    with _stock_restore_forbidden():
        loaded = ksf.load_model_as("tf_keras", stock_dir, compile=False)
    reference = tf_keras.models.load_model(str(stock_dir), compile=False)
    assert type(loaded.optimizer) is type(reference.optimizer)
    ours = {v.name: v.numpy() for v in loaded.optimizer.variables}
    theirs = {v.name: v.numpy() for v in reference.optimizer.variables}
    assert ours.keys() == theirs.keys() and ours
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_load_model_restores_legacy_optimizer_slots(tmp_path):
    model = compiled(dense_adam)
    model.compile(optimizer=tf_keras.optimizers.legacy.Adam(), loss="mse")
    model.train_on_batch(*batch(model))
    model.save(str(tmp_path / "stock"), save_format="tf")
    with _stock_restore_forbidden():
        loaded = ksf.load_model_as("tf_keras", tmp_path / "stock")
    assert loaded.optimizer.get_slot_names() == ["m", "v"]
    saved_state, loaded_state = model.optimizer.variables(), loaded.optimizer.variables()
    assert len(saved_state) == len(loaded_state) == 1 + 2 * len(model.trainable_variables)
    for a, b in zip(saved_state, loaded_state, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    _next_steps_equal(model, loaded, batch(model, seed=4))


def test_an_optimizer_that_does_not_match_the_saved_state_stays_fresh_as_stock(tmp_path):
    """The training config compiles an optimizer whose variables differ from the saved ones (here: it
    was built while a layer was frozen): nothing is restored into it, as stock."""
    model = compiled(dense_adam)
    model.layers[0].trainable = False
    model.compile(optimizer="adam", loss="mse")
    model.train_on_batch(*batch(model))
    model.layers[0].trainable = True
    ksf.save_model(model, tmp_path / "sm")
    loaded = ksf.load_model_as("tf_keras", tmp_path / "sm")
    assert int(loaded.optimizer.iterations.numpy()) == 0
    reference = tf_keras.models.load_model(str(tmp_path / "sm"))
    _next_steps_equal(reference, loaded, batch(model, seed=4))


def test_load_model_options_and_other_threads_keep_stocks_reader(tmp_path):
    """`LoadOptions` that move the reads go to stock; a stock load on another thread while ours runs
    uses TensorFlow's reader (the hook is per thread)."""
    import threading

    from tensorflow.python.checkpoint import functional_saver

    model = trained(dense_adam)
    ksf.save_model(model, tmp_path / "sm")
    calls = []
    restore_v2 = functional_saver.io_ops.restore_v2

    def counting(*args, **kwargs):
        calls.append(threading.get_ident())
        return restore_v2(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(functional_saver.io_ops, "restore_v2", counting)
        options = tf.saved_model.LoadOptions(experimental_io_device="/job:localhost")
        ksf.load_model_as("tf_keras", tmp_path / "sm", options=options)
        assert calls, "stock's reader should read with experimental_io_device"
        calls.clear()
        ksf.load_model_as(
            "tf_keras", tmp_path / "sm", options=tf.saved_model.LoadOptions(allow_partial_checkpoint=True)
        )
        ksf.load_model_as("tf_keras", tmp_path / "sm")
        assert not calls
        worker = threading.Thread(target=tf_keras.models.load_model, args=(str(tmp_path / "sm"),))
        worker.start()
        worker.join()
        assert calls and set(calls) == {worker.ident}


@pytest.mark.parametrize("damage", ["data", "index"])
def test_a_damaged_bundle_is_refused_naming_the_file(tmp_path, damage):
    model = trained(dense_adam)
    ksf.save_model(model, tmp_path / "sm")
    name = "variables.data-00000-of-00001" if damage == "data" else "variables.index"
    path = tmp_path / "sm" / "variables" / name
    data = bytearray(path.read_bytes())
    if damage == "data":
        data[40] ^= 0x10  # inside the first kernel
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(Exception) as info:
        ksf.load_model_as("tf_keras", tmp_path / "sm")
    assert name in str(info.value) + "".join(getattr(info.value, "__notes__", []))


# --- sharded variables (`max_shard_size`) -------------------------------------------------------

TINY_SHARDS_GB = 300 / 1024**3  # 300 bytes: the dense model's kernels and moments go one per shard


def _data_files(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if ".data-" in name)


def test_sharded_saved_model_is_read_by_tensorflow_and_by_us(saved, tmp_path):
    model, stock_dir, _ = saved
    with _stock_checkpoint_forbidden():
        ksf.save_model(model, tmp_path / "sm", max_shard_size=TINY_SHARDS_GB)
    shards = _data_files(tmp_path / "sm" / "variables")
    assert len(shards) > 2 and all(name.endswith(f"-of-{len(shards):05d}") for name in shards)
    ours = tf.train.load_checkpoint(str(tmp_path / "sm" / "variables" / "variables"))
    theirs = tf.train.load_checkpoint(str(stock_dir / "variables" / "variables"))
    keys = theirs.get_variable_to_shape_map()
    assert ours.get_variable_to_shape_map() == keys
    for key in keys:
        if key != "_CHECKPOINTABLE_OBJECT_GRAPH":
            np.testing.assert_array_equal(ours.get_tensor(key), theirs.get_tensor(key), err_msg=key)
    served = tf.saved_model.load(str(tmp_path / "sm"))
    x, _ = batch(model, seed=3)
    (out,) = served.signatures["serving_default"](tf.constant(x)).values()
    np.testing.assert_array_equal(out.numpy(), model(x, training=False).numpy())
    with _stock_restore_forbidden():
        loaded = ksf.load_model_as("tf_keras", tmp_path / "sm")
    for a, b in zip(state(model), state(loaded), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    stock_loaded = tf_keras.models.load_model(str(tmp_path / "sm"))
    for a, b in zip(model.weights, stock_loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_sharded_tf_format_weights_load_in_stock_and_ours(tmp_path):
    model = trained(dense_adam)
    ksf.save_weights(model, tmp_path / "w" / "ckpt", max_shard_size=TINY_SHARDS_GB)
    assert len(_data_files(tmp_path / "w")) > 2
    for load in (lambda m, p: m.load_weights(p), ksf.load_weights):
        target = trained(dense_adam)
        target.train_on_batch(*batch(target, seed=9))  # moves every variable away from the saved values
        load(target, str(tmp_path / "w" / "ckpt"))
        for a, b in zip(state(model), state(target), strict=True):
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(x, y)


def test_sharded_export(tmp_path):
    model = trained(dense_adam)
    ksf.export_saved_model(model, tmp_path / "e", max_shard_size=TINY_SHARDS_GB)
    assert len(_data_files(tmp_path / "e" / "variables")) > 1
    served = tf.saved_model.load(str(tmp_path / "e"))
    x, _ = batch(model, seed=3)
    np.testing.assert_array_equal(served.serve(x).numpy(), model(x).numpy())


def test_max_shard_size_is_checked_and_refused_where_it_does_not_apply(tmp_path):
    model = trained(dense_adam)
    for bad in (0, -1, "1GB", True):
        with pytest.raises(ValueError, match="max_shard_size"):
            ksf.save_model(model, tmp_path / "sm", max_shard_size=bad)
    with pytest.raises(ValueError, match="max_shard_size"):
        ksf.save_model(model, tmp_path / "m.h5", max_shard_size=1)
    with pytest.raises(ValueError, match="max_shard_size"):
        ksf.save_weights(model, tmp_path / "m.weights.h5", max_shard_size=1)
    assert not os.listdir(tmp_path)


def test_string_tensors_are_read_by_us(tmp_path):
    """String variables (any shape, empty and long elements) restore through our reader, as stock's."""
    model = trained(dense_adam)
    model.tags = tf.Variable([[b"a", b""], [b"x" * 300, b"bc"]])
    model.note = tf.Variable(b"scalar note")
    model.save(str(tmp_path / "sm"), save_format="tf")
    reference = tf_keras.models.load_model(str(tmp_path / "sm"))
    with _stock_restore_forbidden():
        loaded = ksf.load_model_as("tf_keras", tmp_path / "sm")
    assert loaded.tags.numpy().tolist() == reference.tags.numpy().tolist() == model.tags.numpy().tolist()
    assert loaded.note.numpy() == reference.note.numpy() == b"scalar note"


def _kernel_after_load(load, path):
    """A new layer's kernel built right after a seeded load: equal only if the load drew stock's seeds."""
    tf_keras.utils.set_random_seed(11)
    load(str(path))
    layer = tf_keras.layers.Dense(4)
    layer.build((None, 3))
    return layer.kernel.numpy()


def test_random_streams_after_a_load_are_stocks(saved):
    """The layers' initializers are not run (the checkpoint overwrites their values) but draw their
    seeds as stock's do: what the user builds after the load is what it is after stock's load."""
    _, stock_dir, _ = saved
    np.testing.assert_array_equal(
        _kernel_after_load(lambda p: ksf.load_model_as("tf_keras", p), stock_dir),
        _kernel_after_load(tf_keras.models.load_model, stock_dir),
    )


def test_variables_no_checkpoint_restores_get_stocks_initial_values(tmp_path):
    """With the checkpoint skipped, every variable holds what its initializer gives, as in stock's load."""
    model = trained(dense_adam)
    model.save(str(tmp_path / "sm"), save_format="tf")
    options = tf.saved_model.LoadOptions(experimental_skip_checkpoint=True)
    loaded = {}
    for name, load in (
        ("stock", tf_keras.models.load_model),
        ("ours", lambda p, **k: ksf.load_model_as("tf_keras", p, **k)),
    ):
        tf_keras.utils.set_random_seed(5)
        loaded[name] = load(str(tmp_path / "sm"), options=options, compile=False)
    for a, b in zip(loaded["stock"].weights, loaded["ours"].weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    assert not np.array_equal(loaded["ours"].weights[0].numpy(), model.weights[0].numpy())


def test_a_graph_of_another_model_is_refused_as_stock_refuses_it(tmp_path):
    """`saved_model.pb` from another model beside this one's variables: stock's restore of the revived
    optimizer finds a slot of another shape and refuses; ours, which does not read those slots,
    checks their shapes and refuses the same way."""
    layers = tf_keras.layers

    def model_with_outputs(n):
        x = tf_keras.Input((4,))
        model = tf_keras.Model(x, layers.Dense(n)(layers.Dense(3)(x)))
        model.compile("adam", "mse")
        model.train_on_batch(np.ones((2, 4), "float32"), np.ones((2, n), "float32"))
        return model

    ksf.save_model(model_with_outputs(2), tmp_path / "a", save_format="tf")
    ksf.save_model(model_with_outputs(5), tmp_path / "b", save_format="tf")
    shutil.copy(tmp_path / "b" / "saved_model.pb", tmp_path / "a" / "saved_model.pb")
    errors = []
    for load in (tf_keras.models.load_model, lambda p: ksf.load_model_as("tf_keras", p)):
        with pytest.raises(ValueError) as raised:
            load(str(tmp_path / "a"))
        errors.append(str(raised.value))
    assert errors[0].startswith("Received incompatible tensor with shape (3, 2)")
    assert errors[1] == errors[0]
