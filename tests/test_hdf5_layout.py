"""The weights' HDF5 layout replayed without h5py (rust/hdf5/layout.rs) against h5py's own, byte
for byte, through both drivers stock writes with (a `.keras` member's file-object driver, a
`.weights.h5` file's POSIX one): every model of the zoo, wide models (B-tree root splits, heap
growth, several global heap collections, headers grown in place, aggregator blocks), and random plans."""

from __future__ import annotations

import os
import string
import tempfile

import h5py
import keras
import numpy as np
import pytest

from conftest import MODELS, _trained
from kerassave_fast.files import SparseImage
from kerassave_fast.formats import weights_h5
from kerassave_fast.keras3 import state


def h5py_layout(plan, posix):
    """h5py's own layout of the plan: over an in-memory image through its file-object driver (a
    `.keras` member), or into a scratch file through libhdf5's POSIX driver (a `.weights.h5`)."""
    if not posix:
        image = SparseImage()
        placed = weights_h5.write_skeleton(image, plan)
        return image.size, [o for o, _ in placed], weights_h5._between_tensors(placed, image.size, image.writes)
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as scratch:
        path = os.path.join(scratch, "h5py.weights.h5")
        placed = weights_h5.write_skeleton(path, plan)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            contents = [os.pread(f.fileno(), end - start, start) for start, end in weights_h5._gaps(placed, size)]
    return size, [o for o, _ in placed], contents


def replayed_layout(plan, posix):
    laid_out = weights_h5._replayed_layout(plan, posix)
    assert laid_out is not None, "the plan should be covered"
    size, placed, contents = laid_out
    return size, [o for o, _ in placed], contents


def assert_replayed_as_h5py(plan):
    for posix in (False, True):
        driver = "POSIX" if posix else "file-object"
        ours, theirs = replayed_layout(plan, posix), h5py_layout(plan, posix)
        assert ours[0] == theirs[0], f"file size ({driver} driver)"
        assert ours[1] == theirs[1], f"tensor offsets ({driver} driver)"
        assert ours[2] == theirs[2], f"metadata bytes ({driver} driver)"


def plan_of(model):
    plan, assets = state.plan_model_state(model, True)
    assets.close()
    return plan


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_models_are_laid_out_as_h5py_lays_them_out(model_zoo, name):
    assert_replayed_as_h5py(plan_of(model_zoo(name)))


@pytest.mark.parametrize("width", [40, 200])  # past the cache: the 1,000-layer test below
def test_wide_models_are_laid_out_as_h5py_lays_them_out(width):
    inputs = keras.Input((3,))
    outputs = keras.layers.Concatenate()([keras.layers.Dense(2)(inputs) for _ in range(width)])
    model = _trained(keras.Model(inputs, outputs), np.ones((2, 3), "float32"), np.ones((2, 2 * width), "float32"))
    assert_replayed_as_h5py(plan_of(model))


_DTYPES = [
    *("float16", "float32", "float64", "bfloat16"),
    *("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"),
]


def random_plan(seed: int) -> weights_h5.WeightsPlan:
    rng = np.random.default_rng(seed)
    letters = string.ascii_letters + string.digits + "_.-"

    def name():
        while (made := "".join(rng.choice(list(letters), int(rng.integers(1, 40))))) in (".", ".."):
            pass  # h5py reads those as paths
        return made

    plan = weights_h5.WeightsPlan()
    groups = [""]
    for _ in range(int(rng.integers(5, 120))):
        if rng.random() < 0.3 or len(groups) == 1:
            parent = groups[int(rng.integers(len(groups)))]
            depth = int(rng.integers(1, 3))  # a missing parent is made as h5py's require_group makes it
            path = "/".join(([parent] if parent else []) + [name() for _ in range(depth)])
            if any(g == path or g.startswith(path + "/") for g in groups):
                continue
            attrs = {"name": name()} if rng.random() < 0.7 else None
            plan.add_group(path, attrs)
            groups.append(path)
            parts = path.split("/")
            groups += ["/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]) not in groups]
        else:
            group = groups[int(rng.integers(1, len(groups)))]
            taken = {d.name for d in plan.datasets if d.group == group}
            taken |= {g.rsplit("/", 1)[-1] for g in groups if g.rpartition("/")[0] == group}
            leaf = str(len(taken)) if rng.random() < 0.6 else name()
            if leaf in taken:
                continue
            rank = int(rng.integers(0, 9))
            shape = tuple(int(rng.integers(0 if rng.random() < 0.05 else 1, 4)) for _ in range(rank))
            dtype = rng.choice(_DTYPES)
            if dtype == "bfloat16":  # its `dtype` attribute fits the header of up to 6 dimensions
                shape, dtype = shape[:6], weights_h5.BFLOAT16
            plan.add_dataset(group, leaf, np.zeros(shape, dtype))
    return plan


@pytest.mark.parametrize("seed", range(24))
def test_random_plans_are_laid_out_as_h5py_lays_them_out(seed):
    assert_replayed_as_h5py(random_plan(seed))


def random_legacy_plan(seed: int) -> weights_h5.WeightsPlan:
    """Groups, attributes of every kind the legacy `.h5` writers set (str, bytes, lists of bytes,
    empty lists, numpy `S` arrays; small to ~3 KB, several per group: headers grow in place and
    into continuation chunks) and tensors made by `create_dataset`, some named through new groups."""
    rng = np.random.default_rng(seed)
    letters = list(string.ascii_letters + string.digits + "_")

    def name(length=None):
        return "".join(rng.choice(letters, length or int(rng.integers(1, 30))))

    values = [
        lambda: name(int(rng.integers(1, 3000))),
        lambda: name(int(rng.integers(1, 3000))).encode(),
        lambda: [name().encode() for _ in range(int(rng.integers(1, 60)))],
        lambda: [],
        lambda: np.asarray([name().encode() for _ in range(int(rng.integers(1, 60)))]),
    ]
    plan = weights_h5.WeightsPlan()
    attributes: dict[str, set[str]] = {"": set()}  # of each group
    for _ in range(int(rng.integers(5, 80))):
        groups = list(attributes)
        pick = rng.random()
        if pick < 0.25:
            parent = groups[int(rng.integers(len(groups)))]
            path = f"{parent}/{name()}" if parent else name()
            if path not in attributes:
                plan.add_group(path)
                attributes[path] = set()
        elif pick < 0.6:
            group, key = groups[int(rng.integers(len(groups)))], name()
            if key not in attributes[group]:
                attributes[group].add(key)
                plan.add_attribute(group, key, values[int(rng.integers(len(values)))]())
        else:
            group = groups[int(rng.integers(len(groups)))]
            leaf = f"{name()}/{name()}" if rng.random() < 0.4 else name()
            shape = tuple(int(rng.integers(1, 5)) for _ in range(int(rng.integers(0, 3))))
            plan.add_dataset(group, leaf, np.zeros(shape, "float32"), created=True)
    return plan


@pytest.mark.parametrize("seed", range(24))
def test_random_legacy_plans_are_laid_out_as_h5py_lays_them_out(seed):
    assert_replayed_as_h5py(random_legacy_plan(seed))


def test_a_large_attribute_early_in_the_file_is_replayed_while_the_cache_is_fresh():
    """600 KB of `model_config`, then strings that go to the collection made before it: past the
    bound on what was touched since (256 KiB), but the file's metadata stays under the metadata
    cache's initial 2 MiB in its first epoch, so nothing can have been evicted yet
    (`FRESH_METADATA` in rust/hdf5/layout.rs). h5py's bytes are the oracle."""
    plan = weights_h5.WeightsPlan()
    plan.add_attribute("", "keras_version", "3.15.1")
    plan.add_attribute("", "model_config", b"x" * 600_000)
    plan.add_attribute("", "training_config", b"y" * 500)
    plan.add_group("model_weights")
    plan.add_attribute("model_weights", "layer_names", [b"dense_%d" % i for i in range(50)])
    for i in range(50):
        group = f"model_weights/dense_{i}"
        plan.add_group(group)
        plan.add_attribute(group, "weight_names", [f"dense_{i}/kernel".encode(), f"dense_{i}/bias".encode()])
        plan.add_dataset(group, f"dense_{i}/kernel", np.zeros((4, 4), "float32"), created=True)
        plan.add_dataset(group, f"dense_{i}/bias", np.zeros(4, "float32"), created=True)
    assert_replayed_as_h5py(plan)


def test_what_is_not_replayed_is_left_to_h5py():
    plan = weights_h5.WeightsPlan()
    plan.add_group("vars", {"name": "caf\u00e9"})  # a non-ASCII value
    assert weights_h5._replayed_layout(plan, posix=False) is None
    plan = weights_h5.WeightsPlan()
    plan.add_group("vars", {"name": "a\x00b"})  # h5py refuses a NUL in a variable-length string
    assert weights_h5._replayed_layout(plan, posix=True) is None
    for attrs in ({"name": np.str_("dense")}, {"k" * 65472: "dense"}):  # h5py refuses both
        plan = weights_h5.WeightsPlan()
        plan.add_group("vars", attrs)
        assert weights_h5._replayed_layout(plan, posix=True) is None
    utf8_strings = np.array([b"abc"], dtype=h5py.string_dtype("utf-8", 3))  # h5py marks these UTF-8
    for path, name, value in [("", "names", utf8_strings), ("", b"names", "x"), (b"", "names", "x")]:
        plan = weights_h5.WeightsPlan()
        plan.add_attribute(path, name, value)
        assert weights_h5._replayed_layout(plan, posix=True) is None
    plan = weights_h5.WeightsPlan()
    plan.add_group("vars")
    plan.add_dataset("vars", "0", np.zeros(3, bool))  # an HDF5 enum
    assert weights_h5._replayed_layout(plan, posix=False) is None
    plan = weights_h5.WeightsPlan()
    plan.add_group("vars")
    plan.add_dataset("vars", "0", np.zeros((1,) * 8, weights_h5.BFLOAT16))  # its `dtype` attribute does not fit
    assert weights_h5._replayed_layout(plan, posix=False) is None


@pytest.mark.parametrize("rank", range(7))
def test_bfloat16_and_its_dtype_attribute_are_laid_out_as_h5py_lays_them_out(rank):
    """Keras 3 stores a bfloat16 tensor as opaque 2-byte words and a `dtype` attribute: a string
    in the global heap, its message in the dataset header's free space."""
    plan = weights_h5.WeightsPlan()
    plan.add_group("vars", {"name": "dense"})
    for i in range(3):
        plan.add_dataset("vars", str(i), np.zeros((2,) * rank, weights_h5.BFLOAT16))
        plan.add_dataset("vars", str(i + 3), np.zeros((2,) * rank, "float32"))
    assert_replayed_as_h5py(plan)


@pytest.mark.parametrize("name", ["convnet", "low_precision"])  # low_precision: bfloat16 and float16
def test_a_first_save_runs_no_h5py_and_writes_stocks_file(model_zoo, tmp_path, monkeypatch, name):
    _assert_first_save_is_stocks_without_h5py(model_zoo(name), tmp_path, monkeypatch)


def test_a_first_save_of_1000_layers_runs_no_h5py_and_writes_stocks_file(tmp_path, monkeypatch):
    """The bench's many-array model (6,002 datasets, ~2.5 MiB of metadata, past libhdf5's smallest
    metadata cache): stock's cache evicts nothing that leaves a trace, so the files are equal."""
    inputs = keras.Input((32,))
    outputs = keras.layers.Concatenate()([keras.layers.Dense(64)(inputs) for _ in range(1000)])
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    _assert_first_save_is_stocks_without_h5py(model, tmp_path, monkeypatch)


def _assert_first_save_is_stocks_without_h5py(model, tmp_path, monkeypatch):
    import kerassave_fast as ksf
    from conftest import member

    weights_h5._LAYOUTS.clear()

    def refuse(*args, **kwargs):
        raise AssertionError("h5py laid out a covered plan")

    monkeypatch.setattr(weights_h5, "write_skeleton", refuse)
    ksf.save_model(model, tmp_path / "ours.keras")
    ksf.save_weights(model, tmp_path / "ours.weights.h5")
    monkeypatch.undo()
    keras.saving.save_model(model, tmp_path / "stock.keras")
    model.save_weights(tmp_path / "stock.weights.h5")
    assert member(tmp_path / "ours.keras", "model.weights.h5") == member(tmp_path / "stock.keras", "model.weights.h5")
    assert (tmp_path / "ours.weights.h5").read_bytes() == (tmp_path / "stock.weights.h5").read_bytes()


def _evicted_heap_moves():
    """A group's local heap used, then left while >2 MiB of metadata is made (libhdf5's metadata
    cache writes it out), then grown until it moves: the old block keeps its written bytes."""
    plan = weights_h5.WeightsPlan()
    plan.add_group("early")
    plan.add_dataset("early", "0", np.zeros(3, "float32"))
    plan.add_group("mid")
    for i in range(12000):
        plan.add_dataset("mid", str(i), np.zeros(1, "float32"))
    for j in range(6):
        plan.add_dataset("early", "late_" + "n" * (30 + j), np.zeros(3, "float32"))
    return plan


def _evicted_collection_reused():
    """A global heap collection left while >2 MiB of metadata is made: evicted, libhdf5 drops it
    from its list of collections with free space, and the next string goes to a new one."""
    plan = weights_h5.WeightsPlan()
    plan.add_group("a", {"name": "dense"})
    plan.add_group("mid")
    for i in range(8000):
        plan.add_dataset("mid", str(i), np.zeros(1, "float32"))
    plan.add_group("b", {"name": "dense_1"})
    return plan


def _evicted_heap_takes_a_name(name: str = "abcdefgh"):
    """An evicted heap's free-block headers are written into its image; a later short name at the
    head of a free block keeps their bytes in its padding (no move needed): "abcdefgh" and its NUL
    leave the block size's upper bytes, which are not zero here."""
    plan = weights_h5.WeightsPlan()
    plan.add_group("early")
    for i in range(44):
        plan.add_dataset("early", f"a{i:02d}", np.zeros(1, "float32"))
    plan.add_group("mid")
    for i in range(12000):
        plan.add_dataset("mid", str(i), np.zeros(1, "float32"))
    plan.add_dataset("early", name, np.zeros(1, "float32"))
    return plan


def _evicted_soon_after_a_huge_heap():
    """A ~2 MiB local heap fills the cache: a heap made after it is evicted ~60 KiB later, then moves."""
    plan = weights_h5.WeightsPlan()
    plan.add_group("big")
    for i in range(30):
        plan.add_dataset("big", f"{i:05d}" + "n" * 70000, np.zeros(1, "float32"))
    plan.add_group("early")
    plan.add_dataset("early", "0", np.zeros(1, "float32"))
    for i in range(200):
        plan.add_dataset("big", f"s{i}", np.zeros(1, "float32"))
    plan.add_dataset("early", "x" * 200, np.zeros(1, "float32"))
    return plan


def _a_layer_of_8000_weights_then_another():
    """What Keras makes of a layer holding 8,000 weights followed by a Dense layer: the collection
    holding the layers' `name` strings is evicted while the big layer's datasets are made, so stock
    puts the Dense layer's name in a new one."""
    plan = weights_h5.WeightsPlan()
    plan.add_group("vars", {"name": "functional"})
    plan.add_group("layers/big/vars", {"name": "big"})
    for i in range(8000):
        plan.add_dataset("layers/big/vars", str(i), np.zeros(4, "float32"))
    plan.add_group("layers/dense/vars", {"name": "dense"})
    plan.add_dataset("layers/dense/vars", "0", np.zeros((4, 2), "float32"))
    return plan


class _NoEvictions(h5py.File):
    """h5py with libhdf5's metadata cache evicting nothing (no resizing, no age-out)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.id.get_mdc_config()
        config.incr_mode = config.flash_incr_mode = config.decr_mode = 0  # off
        config.evictions_enabled = False
        self.id.set_mdc_config(config)


def _aged_out_by_attributes():
    """Found by a review: 1,000 small attributes on two groups cost libhdf5 ~267,000 cache
    accesses over ~100 KB of metadata; the cache's age-out writes `c`'s heap early, then it moves."""
    plan = weights_h5.WeightsPlan()
    plan.add_group("c")
    plan.add_dataset("c", "x" * 30, np.zeros(1, "float32"), created=True)
    plan.add_group("a")
    plan.add_group("b")
    for i in range(500):
        plan.add_attribute("a", f"n{i}", b"v")
        plan.add_attribute("b", f"n{i}", b"v")
    plan.add_dataset("c", "y" * 100, np.zeros(1, "float32"), created=True)
    return plan


def _aged_out_on_a_deep_path():
    """Found by a review: 16 empty attributes on each group of an 80-level path cost libhdf5 about
    280,000 cache accesses over little metadata; the cache's age-out writes `c`'s heap early, then
    it moves. Bounded by counting accesses, not bytes."""
    plan = weights_h5.WeightsPlan()
    plan.add_group("c")
    plan.add_dataset("c", "x" * 30, np.zeros(1, "float32"), created=True)
    path = "a/" + "/".join(["l"] * 79)
    plan.add_group(path)
    for i in range(16):
        for depth in range(80, 0, -1):
            plan.add_attribute(path.rsplit("/", 80 - depth)[0], f"n{i}", [])
    plan.add_dataset("c", "y" * 100, np.zeros(1, "float32"), created=True)
    return plan


@pytest.mark.parametrize(
    "make_plan",
    [
        _aged_out_by_attributes,
        _aged_out_on_a_deep_path,
        _evicted_heap_moves,
        _evicted_collection_reused,
        _evicted_heap_takes_a_name,
        _evicted_soon_after_a_huge_heap,
        _a_layer_of_8000_weights_then_another,
    ],
)
def test_what_the_metadata_cache_may_have_evicted_is_left_to_h5py(make_plan, monkeypatch):
    """The replay does not model libhdf5's metadata cache. On each of these plans stock's bytes
    depend on what the cache evicted (libhdf5 with evictions off writes other bytes), so the
    replay leaves them to h5py."""
    plan = make_plan()
    for posix in (False, True):
        with monkeypatch.context() as patched:
            patched.setattr(h5py, "File", _NoEvictions)
            without_evictions = h5py_layout(plan, posix)
        assert h5py_layout(plan, posix) != without_evictions, "the plan no longer makes the cache evict"
        assert weights_h5._replayed_layout(plan, posix) is None


@pytest.mark.parametrize("seed", range(3))
def test_a_full_list_of_collections_drops_one_as_libhdf5_does(seed):
    """Strings of 200-2,600 bytes in ~40 global heap collections: past 16, libhdf5's list of
    collections with free space drops one for each new collection (H5F_cwfs_add)."""
    rng = np.random.default_rng(seed)
    plan = weights_h5.WeightsPlan()
    for i in range(60):
        plan.add_group(f"g{i}")
        plan.add_attribute(f"g{i}", "names", [b"x" * int(rng.integers(200, 2600)) for _ in range(rng.integers(1, 4))])
    assert_replayed_as_h5py(plan)


@pytest.mark.parametrize("name", ["ab", "abcdefg", "abcdefghijklmno"])
def test_a_name_whose_padding_keeps_nothing_the_cache_wrote_is_replayed(name):
    """The heap of `_evicted_heap_takes_a_name` is evicted, but these names' padding covers only
    zero bytes of the free-block header it left: the file is stock's, and the replay makes it."""
    assert_replayed_as_h5py(_evicted_heap_takes_a_name(name))
