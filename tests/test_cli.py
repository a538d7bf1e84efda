"""The command line: `inspect`, `verify`, `convert` (python -m kerassave_fast)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

import kerassave_fast as ksf
from conftest import assert_same_state
from kerassave_fast import cli
from kerassave_fast.formats.keras_zip import KerasArchive


@pytest.fixture(scope="module")
def files(tmp_path_factory, model_zoo):
    """One model in every container, by stock and by us."""
    import tf_keras_models

    d = tmp_path_factory.mktemp("cli")
    model = model_zoo("low_precision")
    out = {"model": model}
    ksf.save_model(model, d / "ours.keras")
    keras.saving.save_model(model, d / "stock.keras")
    ksf.save_model(model, d / "ours.h5")
    ksf.save_weights(model, d / "ours.weights.h5")
    ksf.save_model(model, d / "gzip.keras", compression="gzip", checksum=True)
    tf_model = tf_keras_models.trained(tf_keras_models.dense_adam)
    ksf.save_model(tf_model, d / "saved_model", save_format="tf")
    ksf.save_weights(tf_model, d / "ckpt")
    ksf.save_model(tf_model, d / "tf_keras.h5")
    out.update({name: str(d / name) for name in os.listdir(d)})
    out["ckpt"] = str(d / "ckpt")
    (d / "sharded").mkdir()
    largest = max(np.asarray(v.numpy()).nbytes for v in model.weights)
    out["sharded"] = str(d / "sharded" / "m.weights.json")
    ksf.save_weights(model, out["sharded"], max_shard_size=2 * largest / 1024**3)
    return out


def _variables(model) -> int:
    return len(model.weights) + len(model.optimizer.variables)


@pytest.mark.parametrize("name", ["ours.keras", "stock.keras", "gzip.keras"])
def test_inspect_keras_zip(files, name):
    report = cli.inspect_file(files[name])
    model = files["model"]
    assert (report.format, report.flavour, report.keras_version) == ("keras-v3-zip", "keras3", keras.__version__)
    assert report.model == "Sequential" and report.optimizer == "Adam"
    assert [x["name"] for x in report.layers][1:] == [layer.name for layer in model.layers]
    assert len(report.variables) == _variables(model)
    dtypes = sorted(v.dtype for v in report.variables)
    assert dtypes == sorted([v.dtype for v in model.weights] + [v.dtype for v in model.optimizer.variables])
    expected_bytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)
    assert sum(v.bytes for v in report.variables if v.name.startswith("layers/")) == expected_bytes
    compressed = {v.compression for v in report.variables if v.shape}
    assert compressed == ({"shuffle+gzip(4)+fletcher32"} if name == "gzip.keras" else {None})


def test_inspect_other_containers(files):
    h5 = cli.inspect_file(files["ours.h5"])
    assert (h5.format, h5.flavour, h5.optimizer) == ("legacy-h5", "keras3", "Adam")
    assert len(h5.variables) == _variables(files["model"])
    weights = cli.inspect_file(files["ours.weights.h5"])
    assert weights.format == "keras-v3-weights-h5" and len(weights.variables) == _variables(files["model"])
    tf_h5 = cli.inspect_file(files["tf_keras.h5"])
    assert (tf_h5.format, tf_h5.flavour) == ("legacy-h5", "tf_keras")
    saved = cli.inspect_file(files["saved_model"])
    assert (saved.format, saved.flavour) == ("tf-saved-model", "tf_keras")
    ckpt = cli.inspect_file(files["ckpt"])
    assert ckpt.format == "tf-checkpoint" and any(v.dtype == "float32" for v in ckpt.variables)
    import tensorflow as tf

    saved_prefix = os.path.join(files["saved_model"], "variables", "variables")
    for report, prefix in ((saved, saved_prefix), (ckpt, files["ckpt"])):
        listed = {name for name, _ in tf.train.list_variables(prefix)}
        assert {v.name for v in report.variables} == listed - {"_CHECKPOINTABLE_OBJECT_GRAPH"}  # not a variable


def test_inspect_sharded_weights(files):
    report = cli.inspect_file(files["sharded"])
    shards = sorted(n for n in os.listdir(os.path.dirname(files["sharded"])) if n.endswith(".weights.h5"))
    assert report.format == "keras-v3-sharded-weights" and len(shards) > 2
    whole = cli.inspect_file(files["ours.weights.h5"])
    assert sorted(v.name.split(":", 1)[1] for v in report.variables) == sorted(v.name for v in whole.variables)
    assert {v.name.split(":", 1)[0] for v in report.variables} == set(shards)
    assert report.total_bytes == whole.total_bytes


def test_inspect_json_and_no_tensorflow(files):
    script = (
        "import sys, kerassave_fast.cli as c; code = c.main(['inspect', '--json', sys.argv[1]]); "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules; sys.exit(code)"
    )
    command = [sys.executable, "-c", script, files["ours.keras"]]
    report = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    assert report["format"] == "keras-v3-zip" and report["total_bytes"] == sum(v["bytes"] for v in report["variables"])


@pytest.mark.parametrize(
    "name", ["ours.keras", "stock.keras", "gzip.keras", "ours.h5", "ours.weights.h5", "sharded", "saved_model", "ckpt"]
)
def test_verify_sound_files(files, name, capsys):
    assert cli.main(["verify", files[name]]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")


@pytest.mark.parametrize("model_name", ["low_precision", "convnet", "embedding_lstm"])
@pytest.mark.parametrize("writer", ["ours", "stock"])
def test_inspect_from_the_rust_walk_reports_the_variables_as_h5py_does(model_zoo, tmp_path, model_name, writer):
    """A `.keras`'s variables from the Rust core's listing (no h5py): names in `visititems`' order
    (vars/10 before vars/2), shapes, dtypes (bfloat16 too) and bytes, as h5py's visit reports them."""
    path = str(tmp_path / "m.keras")
    (ksf.save_model if writer == "ours" else keras.saving.save_model)(model_zoo(model_name), path)
    weights = cli._weights_member(cli._open_keras(path), path)
    listed = cli._listed_variables(cli._listed(weights))
    assert listed is not None, "the walk left the file to h5py"
    with cli._keras_weights(weights, path) as h5:
        assert listed == cli._hdf5_variables(h5)
    assert cli.inspect_file(path).variables == listed


@pytest.mark.parametrize("name", ["ours.keras", "stock.keras"])
@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_a_keras_the_rust_core_walks_whole_is_answered_without_h5py_or_numpy(files, name, command):
    """Their imports were most of `verify`'s and `inspect`'s time beside the CRC pass (and the
    standard library's typing, subprocess and socket a tenth of the rest of the start-up; checked
    on Python 3.11, whose zipfile, dataclasses and argparse import none of them)."""
    script = (
        f"import sys, kerassave_fast.cli as c; code = c.main([{command!r}, sys.argv[1]]); "
        "imported = {'h5py', 'numpy', 'typing', 'subprocess', 'socket', 'importlib.abc'} & set(sys.modules); "
        "assert not imported, imported; sys.exit(code)"
    )
    run = subprocess.run([sys.executable, "-c", script, files[name]], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]


@pytest.mark.parametrize("name", ["saved_model", "ckpt"])
def test_a_tensor_bundle_is_inspected_without_numpy(files, name):
    """The Rust core lists the bundle: nothing of the package that imports numpy is needed."""
    script = (
        "import sys, kerassave_fast.cli as c; code = c.main(['inspect', sys.argv[1]]); "
        "assert 'numpy' not in sys.modules, 'imported'; sys.exit(code)"
    )
    run = subprocess.run([sys.executable, "-c", script, files[name]], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in run.stdout and "variables" in run.stdout


def _keras_holding(files, path, weights: bytes) -> str:
    """A `.keras` of `weights` (its CRCs sound whatever they hold), beside ours' JSON members."""
    import zipfile

    with zipfile.ZipFile(files["ours.keras"]) as source:
        members = {name: source.read(name) for name in ("metadata.json", "config.json")}
    with zipfile.ZipFile(path, "w") as archive:
        for member, content in {**members, "model.weights.h5": weights}.items():
            archive.writestr(member, content)
    return str(path)


def _weights_h5(*dtypes: str) -> bytes:
    import io

    import h5py

    weights = io.BytesIO()
    with h5py.File(weights, "w") as h5:
        for i, dtype in enumerate(dtypes):  # laid out in this order: the last one's bytes end the file
            h5[f"layers/dense/vars/{i}"] = np.arange(1000, dtype=dtype)
    return weights.getvalue()


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_a_name_that_is_not_utf8_is_printed_as_its_bytes_on_a_strict_stdout(files, tmp_path, command):
    """Any UTF-8 locale's stdout is strict: the file's name, not UTF-8, is printed as its bytes."""
    path = os.path.join(os.fsencode(tmp_path), b"w\xe9\xff.keras")
    shutil.copyfile(files["ours.keras"], path)
    env = dict(os.environ, PYTHONIOENCODING="utf-8:strict")
    run = subprocess.run([sys.executable, "-m", "kerassave_fast", command, path], capture_output=True, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(path + b": ")


def test_verify_has_h5py_check_the_datasets_the_rust_core_leaves(files, tmp_path, capsys):
    """A big-endian dataset is not the Rust walk's to read: its bytes cut off are found by h5py's
    check, while a sound copy passes."""
    weights = _weights_h5("<f4", ">f4")
    assert cli.main(["verify", _keras_holding(files, tmp_path / "sound.keras", weights)]) == 0
    assert cli.main(["verify", _keras_holding(files, tmp_path / "cut.keras", weights[:-100])]) == 1
    assert "cut.keras: 'model.weights.h5'" in capsys.readouterr().out


def test_a_keras_libhdf5_refuses_is_a_problem_named_not_a_traceback(files, tmp_path, capsys):
    """A weights dataset holding a message libhdf5 must refuse ("fail if unknown"): h5py raises
    RuntimeError, which `verify` reports and `inspect` turns into an error naming the file."""
    import struct

    from test_hdf5_reader import _message

    weights = bytearray(_weights_h5("<f4", "<f4"))
    at = _message(weights, "layers/dense/vars/0", 5)  # its fill value message, made an unknown one
    struct.pack_into("<H", weights, at, 0x2F)
    weights[at + 4] = 0x80
    path = _keras_holding(files, tmp_path / "refused.keras", bytes(weights))
    assert cli.main(["verify", path]) == 1
    assert "refused.keras: 'model.weights.h5'" in capsys.readouterr().out
    assert cli.main(["inspect", path]) == 1
    assert "refused.keras" in capsys.readouterr().err


def test_verify_finds_weights_shorter_than_their_superblock_says(files, tmp_path, capsys):
    """Every tensor in place, but libhdf5 refuses to open a file that ends before its end-of-file
    address (stock could not load it): the walk leaves that to h5py, which finds it."""
    weights = bytearray(_weights_h5("<f4", "<f4"))
    assert weights[8] == 0, "superblock version 0: the end-of-file address at byte 40"
    weights[40:48] = (len(weights) + 8).to_bytes(8, "little")
    assert cli.main(["verify", _keras_holding(files, tmp_path / "long.keras", bytes(weights))]) == 1
    assert "truncated" in capsys.readouterr().out


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def _copy(files, name: str, tmp_path) -> str:
    import shutil

    target = str(tmp_path / name)
    (shutil.copytree if os.path.isdir(files[name]) else shutil.copyfile)(files[name], target)
    return target


@pytest.mark.parametrize("damage", ["truncated", "a name changed"])
def test_verify_finds_a_damaged_saved_model_graph(files, tmp_path, capsys, damage):
    """saved_model.pb must parse, and equal what fingerprint.pb's hashes say of it."""
    target = _copy(files, "saved_model", tmp_path)
    graph = os.path.join(target, "saved_model.pb")
    with open(graph, "rb") as f:
        data = bytearray(f.read())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        at = data.find(b"dense")
        data[at + 1] = ord("x")
    with open(graph, "wb") as f:
        f.write(data)
    assert cli.main(["verify", target]) == 1
    out = capsys.readouterr().out
    assert ("does not parse" if damage == "truncated" else "saved_model_checksum does not match") in out


def test_verify_of_a_tf_keras_saved_model_needs_no_tf_keras(files):
    """tf_keras is optional: without it, the SavedModel's graph and hashes are still checked."""
    hidden = "import sys; sys.modules['tf_keras'] = None"
    script = f"{hidden}; import kerassave_fast.cli as c; sys.exit(c.main(sys.argv[1:]))"
    command = [sys.executable, "-c", script, "verify", files["saved_model"]]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith(": OK"), run.stderr[-2000:]


def test_a_keras_whose_json_member_is_not_an_object_is_a_named_problem(files, tmp_path, capsys):
    import zipfile

    path = tmp_path / "m.keras"
    with zipfile.ZipFile(files["ours.keras"]) as source, zipfile.ZipFile(path, "w") as archive:
        for name in source.namelist():
            archive.writestr(name, b"[1, 2]" if name == "config.json" else source.read(name))
    assert cli.main(["verify", str(path)]) == 1
    assert "'config.json' is not a JSON object" in capsys.readouterr().out
    assert cli.main(["inspect", str(path)]) == 1
    expected = f"kerassave-fast inspect: {path}: member 'config.json' is not a JSON object"
    assert capsys.readouterr().err.strip() == expected


@pytest.mark.parametrize("threads", ["-1", "300", "two"])
def test_verify_refuses_a_thread_count_out_of_range(files, threads, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["verify", "--threads", threads, files["ours.keras"]])
    assert raised.value.code == 2 and "--threads" in capsys.readouterr().err


def test_convert_to_sharded_weights_is_refused_naming_the_file(files, tmp_path, capsys):
    destination = str(tmp_path / "m.weights.json")
    assert cli.main(["convert", files["ours.keras"], destination]) == 1
    assert destination in capsys.readouterr().err and not os.path.exists(destination)


def test_verify_finds_a_flipped_tensor_byte_in_a_keras_zip(files, tmp_path, capsys):
    path = _copy(files, "ours.keras", tmp_path)
    archive = KerasArchive(path)
    member = archive.by_name["model.weights.h5"]
    _flip(path, archive.zip.data_offset(member.index) + member.size - 3)  # the last tensor's bytes
    del archive
    assert cli.main(["verify", path]) == 1
    assert "Bad CRC-32 for file 'model.weights.h5'" in capsys.readouterr().out


def test_verify_finds_a_flipped_byte_in_a_bundle(files, tmp_path, capsys):
    path = _copy(files, "saved_model", tmp_path)
    data = os.path.join(path, "variables", "variables.data-00000-of-00001")
    _flip(data, os.path.getsize(data) // 2)
    assert cli.main(["verify", path]) == 1
    assert "checksum" in capsys.readouterr().out.lower()


def test_verify_finds_a_truncated_h5(files, tmp_path, capsys):
    path = _copy(files, "ours.h5", tmp_path)
    os.truncate(path, os.path.getsize(path) - 100)
    assert cli.main(["verify", path]) == 1
    assert "truncated" in capsys.readouterr().out  # libhdf5 compares its end-of-file address


def test_verify_finds_a_flipped_checksummed_chunk(files, tmp_path, capsys):
    """gzip + Fletcher-32 chunks: the chunk no longer decodes or its checksum fails."""
    path = _copy(files, "ours.weights.h5", tmp_path)
    ksf.save_weights(files["model"], path, compression="gzip", checksum=True)
    report = cli.inspect_file(path)
    assert all(v.compression for v in report.variables if v.shape)
    import h5py

    with h5py.File(path) as h5:
        name = max((v for v in report.variables), key=lambda v: v.bytes).name
        chunk = h5[name].id.get_chunk_info(0)
    _flip(path, chunk.byte_offset + chunk.size // 2)
    assert cli.main(["verify", path]) == 1
    assert name in capsys.readouterr().out


def test_verify_finds_a_missing_and_a_truncated_shard(files, tmp_path, capsys):
    import shutil

    directory = tmp_path / "sharded"
    shutil.copytree(os.path.dirname(files["sharded"]), directory)
    path = str(directory / "m.weights.json")
    os.truncate(directory / "m_00001.weights.h5", os.path.getsize(directory / "m_00001.weights.h5") - 100)
    assert cli.main(["verify", path]) == 1
    assert "m_00001.weights.h5" in capsys.readouterr().out
    os.unlink(directory / "m_00002.weights.h5")
    assert cli.main(["verify", path]) == 1
    assert "m_00002.weights.h5" in capsys.readouterr().out
    (directory / "m.weights.json").write_text('{"metadata": {}}')
    assert cli.main(["verify", path]) == 1
    assert "not a sharded weights map" in capsys.readouterr().out


def test_verify_refuses_what_is_no_model_file(tmp_path, capsys):
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a model at all")
    assert cli.main(["verify", str(junk)]) == 1
    assert "junk.keras" in capsys.readouterr().out


@pytest.mark.parametrize("destination", ["m.h5", "m.keras", "m.weights.h5"])
def test_convert(files, tmp_path, destination):
    target = str(tmp_path / destination)
    assert cli.main(["convert", files["ours.keras"], target, "--compression", "gzip"]) == 0
    if destination.endswith(".weights.h5"):
        model = keras.saving.load_model(files["ours.keras"])
        ksf.load_weights(model, target)
    else:
        model = ksf.load_model(target)
        assert cli.inspect_file(target).variables[0].compression is not None or destination == "m.h5"
    assert_same_state(files["model"], model)


def test_convert_tf_keras_to_a_saved_model(files, tmp_path):
    import tf_keras

    import tf_keras_models

    target = str(tmp_path / "sm")
    assert cli.main(["convert", files["tf_keras.h5"], target]) == 0
    tf_keras_models.assert_same_state(
        tf_keras.models.load_model(files["tf_keras.h5"]), ksf.load_model_as("tf_keras", target)
    )


@pytest.mark.parametrize("name", ["ours.weights.h5", "sharded"])
def test_convert_refuses_weights_only(files, tmp_path, capsys, name):
    assert cli.main(["convert", files[name], str(tmp_path / "m.keras")]) == 1
    assert "weights only" in capsys.readouterr().err


def test_bench_runs_the_benchmark_suite(capfd):
    assert cli.main(["bench", "--help"]) == 0
    assert "--units" in capfd.readouterr().out


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "kerassave_fast", "--help"], capture_output=True, text=True, check=True)
    assert all(command in out.stdout for command in ("inspect", "verify", "convert", "bench"))


def test_verify_passes_sound_zstd_files_without_hdf5plugin(model_zoo, tmp_path):
    """zstd chunks are decoded by the Rust core, as our loads decode them: no plugin needed."""
    model = model_zoo("low_precision")
    paths = [tmp_path / "z.keras", tmp_path / "z.weights.h5", tmp_path / "z.h5"]
    ksf.save_model(model, paths[0], compression="zstd", checksum=True, chunk_bytes=64)
    ksf.save_weights(model, paths[1], compression="zstd", chunk_bytes=64)
    ksf.save_model(model, paths[2], compression="zstd", chunk_bytes=64)
    script = (
        "import sys, h5py, kerassave_fast.cli as c\n"
        "assert not h5py.h5z.filter_avail(32015), 'zstd readable by h5py: the test would prove nothing'\n"
        "sys.exit(max(c.main(['verify', p]) for p in sys.argv[1:]))"
    )
    run = subprocess.run([sys.executable, "-c", script, *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]


def test_verify_and_inspect_refuse_a_file_libhdf5_hangs_on(model_zoo, tmp_path):
    """The Rust core walks the file before h5py opens it: a damaged global heap, on which libhdf5
    loops forever reading an attribute, is an error naming it, not a hang."""
    from test_hdf5_reader import _grow_last_heap_object
    from test_legacy_h5 import stock_save  # not keras.saving's: it would drop the shared model's optimizer

    path = tmp_path / "m.h5"
    stock_save(model_zoo("optimizer_adam"), path)
    data = bytearray(path.read_bytes())
    _grow_last_heap_object(data)
    path.write_bytes(bytes(data))
    for command in ("verify", "inspect"):
        script = f"import sys, kerassave_fast.cli as c; sys.exit(c.main([{command!r}, sys.argv[1]]))"
        run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and "global heap" in run.stdout + run.stderr, run.stdout + run.stderr[-2000:]


def _rezipped(source: str, target, edit) -> str:
    """`source`'s members rewritten to `target`, `edit(name, data)` giving each one's new bytes (None: dropped)."""
    import zipfile

    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)
    return str(target)


@pytest.mark.parametrize("metadata", [None, b'{"keras_version": 3}', b"[1]", b"not json"], ids=str)
def test_a_keras_whose_metadata_stock_never_reads_inspects_verifies_and_converts(files, tmp_path, metadata):
    path = _rezipped(
        files["ours.keras"], tmp_path / "odd.keras", lambda name, data: metadata if name == "metadata.json" else data
    )
    keras.saving.load_model(path)  # stock loads it
    report = cli.inspect_file(path)
    assert report.keras_version in (None, 3) and report.flavour is None
    assert len(report.variables) == _variables(files["model"])
    assert cli.main(["verify", path]) == 0
    assert cli.main(["convert", path, str(tmp_path / "m.h5")]) == 0
    assert_same_state(files["model"], ksf.load_model(tmp_path / "m.h5"))


def test_a_multi_line_error_is_printed_as_one_line(files, tmp_path, capsys, monkeypatch):
    from kerassave_fast import api

    def fails(flavour, path):  # as Keras fails on an unknown custom class: its whole config after the first line
        raise TypeError(f"Could not locate class 'NoSuchLayer'.\nFull object config: {{'config': {'x' * 5000!r}}}")

    monkeypatch.setattr(api, "load_model_as", fails)
    assert cli.main(["convert", files["ours.keras"], str(tmp_path / "m.h5")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Could not locate class 'NoSuchLayer'. [...]" in err and files["ours.keras"] in err
    assert len(err) < 1000


@pytest.mark.parametrize("destination", ["m.kears", "m.KERAS", "m.keras/"])
def test_convert_of_a_keras3_model_to_a_suffix_naming_no_format_is_refused_as_stocks_save(
    files, tmp_path, destination, capsys
):
    with pytest.raises(ValueError):
        files["model"].save(os.path.join(tmp_path, destination))  # stock
    assert cli.main(["convert", files["ours.keras"], os.path.join(tmp_path, destination)]) == 1
    assert os.listdir(tmp_path) == []
    why = "after which a separator asks for a directory" if destination.endswith("/") else "names no format"
    assert why in capsys.readouterr().err


def test_inspect_names_the_zstd_level(files, tmp_path):
    path = tmp_path / "zstd.keras"
    ksf.save_model(files["model"], path, compression="zstd", compression_level=7)
    assert {v.compression for v in cli.inspect_file(str(path)).variables if v.compression} == {"shuffle+zstd(7)"}
