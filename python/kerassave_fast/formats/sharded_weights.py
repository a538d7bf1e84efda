"""Sharded weights files (`save_weights(..., max_shard_size=...)` to a `.weights.json`): a JSON map
and `{base}_{k:05}.weights.h5` shards, cut where stock's `ShardedH5IOStore` cuts them.

Each shard is a weights plan of its own, written as any `.weights.h5` is (layout by h5py, tensor
bytes by the Rust core); the shards are written side by side and renamed into place, the map last.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..asynchronous import side_by_side
from ..files import atomic_replace_all
from .weights_h5 import Compression, PlannedDataset, PlannedGroup, WeightsPlan, write_weights_file


@dataclass
class ShardedPlan:
    """The shards' plans, in order, and the JSON map stock writes beside them."""

    shards: list[WeightsPlan]
    names: list[str]
    config: dict

    @property
    def map_json(self) -> str:
        return json.dumps(self.config, indent=4)


def shard_name(base: str, index: int) -> str:
    return f"{base}_{index:05}.weights.h5"


def base_name(filepath: str) -> str:
    """Stock's shard prefix: the map's file name without `.json` and any `.weights`."""
    return pathlib.Path(filepath).stem.replace(".weights", "")


def shards_there(filepath: str) -> list[str]:
    """The files beside `filepath` named as its shards (whatever their number): what a sharded save
    of it may rewrite."""
    directory, prefix, suffix = os.path.dirname(filepath) or ".", base_name(filepath) + "_", ".weights.h5"
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    numbers = {n: n[len(prefix) : -len(suffix)] for n in names if n.startswith(prefix) and n.endswith(suffix)}
    return [os.path.join(directory, n) for n, k in numbers.items() if len(k) >= 5 and k.isascii() and k.isdigit()]


def split(
    plan: WeightsPlan,
    filepath: str,
    max_shard_bytes: float,
    size_of: Callable[[np.ndarray], float],
    too_large: Callable[[str, float, float], Exception],
) -> ShardedPlan:
    """Cuts `plan` as stock's `ShardedH5IOStore.__setitem__` does, tensor by tensor in order: a
    tensor that would take the current shard past `max_shard_bytes` opens the next one, where its
    variables' group is made again (without its metadata, which stays where it was made).

    The flavour says how large a tensor is (`size_of`, in bytes: stock's arithmetic, a float) and
    what to raise for one larger than a shard (`too_large(name, size, max_shard_bytes)`) -- raised
    here before anything is written."""
    base = base_name(filepath)
    shards, names = [WeightsPlan()], [shard_name(base, 0)]
    weight_map: dict[str, str | list[str]] = {}
    current, total = 0.0, 0  # (stock's total: an int until a tensor is added, `0` in a map of none)
    made = None  # the variables group made in the current shard
    for step in plan.steps:
        if isinstance(step, PlannedGroup):
            if step.attrs:  # made at once, in the shard open at the time; else with its first tensor
                shards[-1].steps.append(step)
                made = step.path
            continue
        if not isinstance(step, PlannedDataset):
            raise TypeError(f"a sharded weights file holds groups and datasets, not {type(step).__name__}")
        size = size_of(step.array)
        total += size
        if size > max_shard_bytes:
            raise too_large(step.name, size, max_shard_bytes)
        current += size
        if current > max_shard_bytes:
            shards.append(WeightsPlan())
            names.append(shard_name(base, len(names)))
            current, made = size, None
        if made != step.group:
            shards[-1].steps.append(PlannedGroup(step.group, None))
            made = step.group
        shards[-1].steps.append(step)
        path = "/" + step.group
        if path not in weight_map:
            weight_map[path] = names[-1]
        else:
            if not isinstance(weight_map[path], list):
                weight_map[path] = [weight_map[path]]
            if names[-1] not in weight_map[path]:
                weight_map[path].append(names[-1])
    return ShardedPlan(shards, names, {"metadata": {"total_size": total}, "weight_map": weight_map})


def write(sharded: ShardedPlan, filepath: str, threads: int = 0, compression: Compression | None = None, alignment=1):
    """Writes every shard and then the map, each beside its target, renamed into place only once
    all are complete (the map last: readers open it first)."""
    directory = os.path.dirname(filepath)
    paths = [os.path.join(directory, name) for name in sharded.names]
    with atomic_replace_all([*paths, filepath]) as destinations:
        writes = [
            functools.partial(write_weights_file, d, plan, threads, compression, alignment)
            for d, plan in zip(destinations[:-1], sharded.shards, strict=True)
        ]
        side_by_side(writes, workers=2)
        destinations[-1].file.write_tensors([0], [np.frombuffer(sharded.map_json.encode(), np.uint8)])


def files_to_open(filepath: str, config: dict) -> list[str] | None:
    """The shard files stock's reader may open for this map (the first shard, which it opens
    first, and every one the map names), or None for a map that is not one stock writes (left
    to stock, and its errors) or names anything but a file beside it."""
    weight_map = config.get("weight_map") if isinstance(config, dict) else None
    if not isinstance(weight_map, dict):
        return None
    names = [shard_name(base_name(filepath), 0)]
    for value in weight_map.values():
        for name in value if isinstance(value, list) else [value]:
            if not isinstance(name, str) or name in (".", "..") or "/" in name or "\0" in name or not name:
                return None
            if name not in names:
                names.append(name)
    return names
