"""The HDF5 file h5py writes for a Keras 3 weights member, laid out without h5py.

A `.keras` member is written by stock through h5py's file-object driver with libhdf5's defaults:
superblock 0, old-style groups (a v1 B-tree of symbol-table nodes, names in a local heap), v1
object headers, contiguous datasets whose storage is allocated at their first write, and each
group's `name` attribute (and a bfloat16 dataset's `dtype`) a variable-length string in a global
heap collection. That driver
aggregates nothing: every allocation takes the smallest free section that fits (metadata and raw
data apart, as its free-list map does), else grows the file. Replaying libhdf5's allocations and
its B-tree, heap and object header rules gives the file's bytes without running it: a first save
of an architecture no longer waits for h5py. Only what this module covers is laid out here
(`lay_out` returns None otherwise); the tests hold it to h5py's bytes.
"""

from __future__ import annotations

import struct

import numpy as np

HDF5_VERSION = "1.14.6"  # the libhdf5 whose allocations this replays (h5py's bundled one)

_UNDEFINED = 0xFFFFFFFFFFFFFFFF
_META, _RAW = 0, 1  # the free-list map's two kinds of space
_LEAF_K, _NODE_K = 4, 16  # symbol-table node and group B-tree widths (superblock 0 defaults)
_SNOD_SIZE = 8 + 2 * _LEAF_K * 40
_BTREE_SIZE = 24 + 2 * _NODE_K * 16 + 8
_HEAP_PREFIX, _HEAP_HINT, _HEAP_FREE_MIN = 32, 88, 16
_GROUP_HEADER = 40  # prefix + the symbol-table message
_DATASET_HEADER = 16 + 256  # prefix + H5D's minimum header size
_GHEAP_MIN, _GHEAP_OBJECT, _GHEAP_HEADER, _CWFS_MAX = 4096, 16, 16, 16
_SPLIT_RATIOS = (0.1, 0.5, 0.9)  # left-most, middle, right-most B-tree node
_MAX_RANK = 8  # the dataspace message still fits the minimum header with the other messages
_FLOAT_BITS = {2: (15, 10, 5, 10, 15), 4: (31, 23, 8, 23, 127), 8: (63, 52, 11, 52, 1023)}


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _message(kind: int, body: bytes, flags: int = 0) -> bytes:
    body += bytes(_align8(len(body)) - len(body))
    return struct.pack("<HHB3x", kind, len(body), flags) + body


class _Space:
    """H5MF without aggregation: smallest-fit free sections per kind, merged and given back at the end."""

    def __init__(self):
        self.end = 0
        self.free: tuple[list, list] = ([], [])  # [address, size] sections of each kind

    def alloc(self, kind: int, size: int) -> int:
        best = None  # the smallest section that fits, the lowest of equal ones (H5FS's size-ordered bins)
        for section in self.free[kind]:
            if section[1] >= size and (best is None or (section[1], section[0]) < (best[1], best[0])):
                best = section
        if best is None:
            self.end += size
            return self.end - size
        address = best[0]
        self._take(kind, best, size)
        return address

    def _take(self, kind: int, section: list, size: int) -> None:
        """Takes `size` bytes off the front of a free section."""
        if section[1] == size:
            self.free[kind].remove(section)
        else:
            section[0] += size
            section[1] -= size

    def release(self, kind: int, address: int, size: int) -> None:
        sections = self.free[kind]
        for section in list(sections):
            if section[0] + section[1] == address:
                sections.remove(section)
                address, size = section[0], section[1] + size
            elif address + size == section[0]:
                sections.remove(section)
                size += section[1]
        if address + size == self.end:
            self.end = address
        else:
            sections.append([address, size])

    def try_extend(self, kind: int, address: int, size: int, extra: int) -> bool:
        if address + size == self.end:
            self.end += extra
            return True
        for section in self.free[kind]:
            if section[0] == address + size and section[1] >= extra:
                self._take(kind, section, extra)
                return True
        return False


class _LocalHeap:
    """A group's names (H5HL): first-fit free list, doubled when full, moved when it cannot grow in place."""

    def __init__(self, space: _Space):
        self.space = space
        self.address = space.alloc(_META, _HEAP_PREFIX + _HEAP_HINT)
        self.data_address = self.address + _HEAP_PREFIX
        self.data = bytearray(_HEAP_HINT)
        self.free = [[0, _HEAP_HINT]]  # [offset, size], the list's head first
        self.names: dict[int, bytes] = {}  # offset -> name: the B-tree compares names at every step

    def insert(self, raw: bytes) -> int:
        need = _align8(len(raw))
        offset, last = None, None
        for block in self.free:
            if block[1] > need and block[1] - need >= _HEAP_FREE_MIN:
                offset = block[0]
                block[0] += need
                block[1] -= need
                break
            if block[1] == need:
                offset = block[0]
                self.free.remove(block)
                break
            if last is None or last[0] < block[0]:
                last = block
        if offset is None:
            offset = self._grow(need, last)
        self.data[offset : offset + len(raw)] = raw
        self.names[offset] = raw[:-1]
        return offset

    def _grow(self, need: int, last) -> int:
        old = len(self.data)
        tail = last is not None and last[0] + last[1] == old
        more = max(need, old)
        if not tail and more < need + _HEAP_FREE_MIN:
            more = need
        if not self.space.try_extend(_META, self.data_address, old, more):
            self.space.release(_META, self.data_address, old)
            self.data_address = self.space.alloc(_META, old + more)
        self.data.extend(bytes(more))
        if tail:
            offset = last[0]
            last[0] += need
            last[1] += more - need
            if last[1] < _HEAP_FREE_MIN:
                self.free.remove(last)
            return offset
        if more - need >= _HEAP_FREE_MIN:
            self.free.insert(0, [old + need, more - need])
        return old

    def name(self, offset: int) -> bytes:
        return self.names[offset]

    def pieces(self) -> list[tuple[int, bytes]]:
        data = bytearray(self.data)
        for i, (offset, size) in enumerate(self.free):
            following = self.free[i + 1][0] if i + 1 < len(self.free) else 1
            data[offset : offset + 16] = struct.pack("<QQ", following, size)
        head = self.free[0][0] if self.free else 1
        prefix = b"HEAP" + bytes(4) + struct.pack("<QQQ", len(self.data), head, self.data_address)
        return [(self.address, prefix), (self.data_address, bytes(data))]


class _SymbolNode:
    def __init__(self, file: _File):
        self.address = file.space.alloc(_META, _SNOD_SIZE)
        self.entries: list[tuple[int, int, _Group | None]] = []  # (name offset, header address, group)
        file.objects.append(self)

    def pieces(self) -> list[tuple[int, bytes]]:
        out = [b"SNOD\x01\x00" + struct.pack("<H", len(self.entries))]
        for name_offset, header, group in self.entries:
            if group is None:
                out.append(struct.pack("<QQII16x", name_offset, header, 0, 0))
            else:  # a group's entry caches where its symbol table is
                out.append(struct.pack("<QQIIQQ", name_offset, header, 1, 0, group.tree.address, group.heap.address))
        data = b"".join(out)
        return [(self.address, data + bytes(_SNOD_SIZE - len(data)))]


class _TreeNode:
    def __init__(self, file: _File, level: int = 0):
        self.address = file.space.alloc(_META, _BTREE_SIZE)
        self.level = level
        self.keys = [0]  # heap offsets of names: child i holds names in (keys[i], keys[i + 1]]
        self.children: list = []
        self.left = self.right = _UNDEFINED
        file.objects.append(self)
        file.tree_nodes[self.address] = self

    def pieces(self) -> list[tuple[int, bytes]]:
        data = b"TREE\x00" + bytes([self.level]) + struct.pack("<HQQ", len(self.children), self.left, self.right)
        data += b"".join(
            struct.pack("<QQ", key, child.address) for key, child in zip(self.keys, self.children, strict=False)
        )  # keys: one more
        if self.children:
            data += struct.pack("<Q", self.keys[len(self.children)])
        return [(self.address, data + bytes(_BTREE_SIZE - len(data)))]


_VLEN_STRING = bytes([0x19, 1, 1, 0]) + struct.pack("<I", 16) + bytes([0x10, 0, 0, 0]) + struct.pack("<IHH", 1, 0, 8)


def _string_attribute_size(name: str) -> int:
    """The body size of `_string_attribute`'s message."""
    return 8 + _align8(len(name) + 1) + _align8(len(_VLEN_STRING)) + 8 + 16


def _string_attribute(file: _File, name: str, value: str) -> bytes:
    """The attribute message of h5py's `attrs[name] = value` (a UTF-8 variable-length string, its
    value put in the global heap now)."""
    encoded = name.encode() + b"\0"
    raw = value.encode()
    collection, index = file.global_heap.insert(raw)
    body = struct.pack("<BBHHH", 1, 0, len(encoded), len(_VLEN_STRING), 8)
    body += encoded + bytes(_align8(len(encoded)) - len(encoded))
    body += _VLEN_STRING + bytes(_align8(len(_VLEN_STRING)) - len(_VLEN_STRING))
    body += bytes([1, 0, 0, 0, 0, 0, 0, 0]) + struct.pack("<IQI", len(raw), collection, index)
    return _message(0x0C, body)


class _Group:
    """An old-style group: header, B-tree, local heap; links inserted as H5B/H5G insert them."""

    def __init__(self, file: _File):
        self.file = file
        self.address = file.space.alloc(_META, _GROUP_HEADER)
        self.tree = _TreeNode(file)
        self.heap = _LocalHeap(file.space)
        self.heap.insert(b"\0")
        self.attribute: tuple[int | None, bytes] | None = None  # (continuation chunk or None, message)
        file.objects.append(self)

    def add_string_attribute(self, name: str, value: str) -> None:
        """`attrs[name] = value`: grows the header in place if free space follows it, else moves its
        symbol-table message into a new chunk beside the attribute; the value goes to the global heap."""
        size = _string_attribute_size(name)
        space = self.file.space
        chunk = (
            None
            if space.try_extend(_META, self.address, _GROUP_HEADER, 8 + size)
            else space.alloc(_META, 24 + 8 + size)
        )
        self.attribute = (chunk, _string_attribute(self.file, name, value))

    def pieces(self) -> list[tuple[int, bytes]]:
        table = _message(0x11, struct.pack("<QQ", self.tree.address, self.heap.address))
        if self.attribute is None:
            header = [(self.address, struct.pack("<BBHII4x", 1, 0, 1, 1, 24) + table)]
        elif self.attribute[0] is None:
            message = self.attribute[1]
            header = [(self.address, struct.pack("<BBHII4x", 1, 0, 2, 1, 24 + len(message)) + table + message)]
        else:
            chunk, message = self.attribute
            moved = table + message
            continuation = _message(0x10, struct.pack("<QQ", chunk, len(moved)))
            header = [(self.address, struct.pack("<BBHII4x", 1, 0, 3, 1, 24) + continuation), (chunk, moved)]
        return header + self.heap.pieces()

    def link(self, name: bytes, address: int, group: _Group | None = None) -> None:
        """H5G__stab_insert: H5B_insert of the name, splitting nodes as libhdf5 does."""
        root = self.tree
        split = self._insert(root, name, (address, group))
        if split is None:
            return
        middle, right = split  # the root split: its content moves, a new root takes its address
        moved = _TreeNode(self.file, root.level)
        moved.keys, moved.children, moved.left, moved.right = root.keys, root.children, root.left, root.right
        right.left = moved.address
        root.keys = [moved.keys[0], middle, right.keys[len(right.children)]]
        root.children = [moved, right]
        root.level += 1
        root.left = root.right = _UNDEFINED

    def _compare(self, name: bytes, left: int, right: int) -> int:
        if name <= self.heap.name(left):
            return -1
        return 1 if name > self.heap.name(right) else 0

    def _insert(self, node: _TreeNode, name: bytes, target) -> tuple[int, object] | None:
        """H5B__insert_helper: returns (middle key, new right sibling) when `node` split."""
        low, high, cmp, i = 0, len(node.children), -1, 0
        while low < high and cmp:
            i = (low + high) // 2
            cmp = self._compare(name, node.keys[i], node.keys[i + 1])
            if cmp < 0:
                high = i
            else:
                low = i + 1
        if not node.children:  # the first name: the first leaf
            node.children, node.keys, i = [_SymbolNode(self.file)], [0, 0], 0
        elif cmp > 0:
            i = len(node.children) - 1
        elif cmp < 0:
            i = 0
        child = node.children[i]
        if node.level:
            split = self._insert(child, name, target)
            node.keys[i + 1] = (split[1] if split else child).keys[-1]
        else:
            split = self._insert_in_leaf(child, name, target, node, i)
        if split is None:
            return None
        middle, new = split
        into, at, right = node, i, None
        if len(node.children) == 2 * _NODE_K:
            right = self._split(node, i)
            if i >= len(node.children):
                into, at = right, i - len(node.children)
        into.keys.insert(at + 1, middle)
        into.children.insert(at + 1, new)
        return None if right is None else (right.keys[0], right)

    def _split(self, node: _TreeNode, i: int) -> _TreeNode:
        """H5B__split: the new right node takes the children past `nleft`."""
        two_k = 2 * _NODE_K
        ratio = _SPLIT_RATIOS[2 if node.right == _UNDEFINED else 0 if node.left == _UNDEFINED else 1]
        nleft = int(two_k * ratio)
        if i < nleft and nleft == two_k:
            nleft -= 1
        elif i >= nleft and nleft == 0:
            nleft += 1
        right = _TreeNode(self.file, node.level)
        right.keys, right.children = node.keys[nleft:], node.children[nleft:]
        node.keys, node.children = node.keys[: nleft + 1], node.children[:nleft]
        right.left, right.right = node.address, node.right
        if node.right != _UNDEFINED:
            self.file.tree_nodes[node.right].left = right.address
        node.right = right.address
        return right

    def _insert_in_leaf(self, leaf: _SymbolNode, name: bytes, target, node: _TreeNode, i: int):
        """H5G__node_insert: the name joins the heap, then the node, which splits in halves when full."""
        entries = leaf.entries
        low, high, at, cmp = 0, len(entries), -1, 1
        while low < high:
            at = (low + high) // 2
            other = self.heap.name(entries[at][0])
            cmp = (name > other) - (name < other)
            if cmp == 0:
                raise ValueError(f"{name!r} is already in the group")
            if cmp < 0:
                high = at
            else:
                low = at + 1
        at += 1 if cmp > 0 else 0
        offset = self.heap.insert(name + b"\0")
        entry = (offset, target[0], target[1])
        if len(entries) < 2 * _LEAF_K:
            if at == len(entries):
                node.keys[i + 1] = offset
            entries.insert(at, entry)
            return None
        right = _SymbolNode(self.file)
        right.entries, leaf.entries = entries[_LEAF_K:], entries[:_LEAF_K]
        middle = leaf.entries[-1][0]
        if at <= _LEAF_K:
            into = leaf
            if at == _LEAF_K:
                middle = offset
        else:
            at -= _LEAF_K
            into = right
            if at == _LEAF_K:
                node.keys[i + 1] = offset
        into.entries.insert(at, entry)
        return middle, right


class _Collection:
    def __init__(self, space: _Space, size: int):
        self.size = _align8(max(_GHEAP_MIN, size))
        self.address = space.alloc(_RAW, self.size)
        self.objects: list[bytes] = []
        self.free = self.size - _GHEAP_HEADER

    def pieces(self) -> list[tuple[int, bytes]]:
        data = b"GCOL\x01\x00\x00\x00" + struct.pack("<Q", self.size)
        for index, raw in enumerate(self.objects, 1):
            data += struct.pack("<HHIQ", index, 0, 0, len(raw)) + raw + bytes(_align8(len(raw)) - len(raw))
        if self.free >= _GHEAP_OBJECT:
            data += struct.pack("<HHIQ", 0, 0, 0, self.free)
        return [(self.address, data + bytes(self.size - len(data)))]


class _GlobalHeap:
    """H5HG with the file's list of collections with free space (CWFS)."""

    def __init__(self, file: _File):
        self.file = file
        self.with_space: list[_Collection] = []

    def insert(self, raw: bytes) -> tuple[int, int]:
        need = _GHEAP_OBJECT + _align8(len(raw))
        found = next((i for i, c in enumerate(self.with_space) if c.free >= need), None)
        if found is None:
            for c in self.with_space:
                extra = max(c.size, need - c.free)
                if c.size + extra <= 65536 and self.file.space.try_extend(_RAW, c.address, c.size, extra):
                    raise _NotCovered("a global heap collection would grow in place")
            collection = _Collection(self.file.space, need + _GHEAP_HEADER)
            self.file.objects.append(collection)
            if len(self.with_space) < _CWFS_MAX:
                self.with_space.insert(0, collection)
            else:
                raise _NotCovered("more global heap collections than libhdf5 keeps track of")
        else:
            collection = self.with_space[found]
            if found:  # one step closer to the front
                self.with_space[found - 1 : found + 1] = [collection, self.with_space[found - 1]]
        collection.objects.append(raw)
        collection.free -= need
        return collection.address, len(collection.objects)


class _NotCovered(Exception):
    """The file needs something this module does not replay: h5py lays it out."""


_HEADERS: dict[tuple, tuple[bytes, bytes]] = {}  # (dtype, shape) -> a dataset header's fixed bytes


class _Dataset:
    def __init__(self, file: _File, array: np.ndarray):
        self.array = array
        self.address = file.space.alloc(_META, _DATASET_HEADER)
        self.data_address = _UNDEFINED
        self.attribute: bytes | None = None
        file.objects.append(self)

    def write_first_element(self, file: _File) -> None:
        """The first write allocates the storage (contiguous, late allocation)."""
        if self.array.size:
            self.data_address = file.space.alloc(_RAW, self.array.nbytes)

    def add_string_attribute(self, file: _File, name: str, value: str) -> None:
        """`attrs[name] = value` (Keras' `dtype` of a bfloat16): the message takes the front of the
        header's null message, which keeps the rest."""
        before, after = self._fixed()
        if 8 + _string_attribute_size(name) + 8 > _null_size(before, after) + 8:
            raise _NotCovered("the attribute does not fit the dataset's header")
        self.attribute = _string_attribute(file, name, value)

    def _fixed(self) -> tuple[bytes, bytes]:
        key = (self.array.dtype.str, self.array.shape)
        if key not in _HEADERS:  # made once per kind of dataset: all but the data address
            if len(_HEADERS) > 4096:
                _HEADERS.clear()
            _HEADERS[key] = self._header()
        return _HEADERS[key]

    def pieces(self) -> list[tuple[int, bytes]]:
        before, after = self._fixed()
        null = _null_size(before, after)
        if self.attribute is not None:  # one message more, the null message shorter
            before = before[:2] + struct.pack("<H", 6) + before[4:]
            after += self.attribute
            null -= len(self.attribute)
        header = before + struct.pack("<Q", self.data_address) + after + struct.pack("<HHB3x", 0, null, 0)
        return [(self.address, header + bytes(_DATASET_HEADER - len(header)))]

    def _header(self) -> tuple[bytes, bytes]:
        """The header's bytes before and after the data address in its layout message."""
        array = self.array
        if array.ndim:
            space = bytes([1, array.ndim, 1, 0, 0, 0, 0, 0]) + struct.pack(f"<{array.ndim}Q", *array.shape) * 2
        else:
            space = bytes([1, 0, 0, 0, 0, 0, 0, 0])
        size = array.dtype.itemsize
        if array.dtype.kind == "V":  # bfloat16: h5py stores it as opaque bytes, with no tag
            dtype = bytes([0x15, 0, 0, 0]) + struct.pack("<I", size)
        elif array.dtype.kind == "f":
            sign, exponent_at, exponent_bits, mantissa_bits, bias = _FLOAT_BITS[size]
            dtype = bytes([0x11, 0x20, sign, 0]) + struct.pack(
                "<IHHBBBBI", size, 0, size * 8, exponent_at, exponent_bits, 0, mantissa_bits, bias
            )
        else:
            dtype = bytes([0x10, 0x08 if array.dtype.kind == "i" else 0, 0, 0]) + struct.pack("<IHH", size, 0, size * 8)
        messages = _message(1, space) + _message(3, dtype, 1) + _message(5, bytes([2, 2, 2, 1, 0, 0, 0, 0]), 1)
        before = struct.pack("<BBHII4x", 1, 0, 5, 1, _DATASET_HEADER - 16) + messages
        before += struct.pack("<HHB3x", 8, 24, 0) + bytes([3, 1])  # contiguous layout, version 3
        after = struct.pack("<Q", array.nbytes if array.size else 0) + bytes(6)
        return before, after


def _null_size(before: bytes, after: bytes) -> int:
    """The size of the null message that fills the rest of a dataset's header."""
    return _DATASET_HEADER - (len(before) + 8 + len(after)) - 8


class _File:
    def __init__(self):
        self.space = _Space()
        self.space.alloc(_META, 96)  # the superblock
        self.objects: list = []
        self.tree_nodes: dict[int, _TreeNode] = {}
        self.global_heap = _GlobalHeap(self)
        self.root = _Group(self)
        self.groups = {"": self.root}

    def group(self, path: str, attrs: dict | None) -> None:
        parent, _, leaf = path.rpartition("/")
        if parent not in self.groups:
            self.group(parent, None)  # h5py's require_group: HDF5 makes the missing parents first
        group = _Group(self)
        self.groups[parent].link(leaf.encode(), group.address, group)
        self.groups[path] = group
        for key, value in (attrs or {}).items():
            group.add_string_attribute(key, value)

    def dataset(self, group: str, name: str, array: np.ndarray, attrs: dict | None) -> _Dataset:
        """`group[name] = array` (created, written, then linked), or with `attrs` Keras'
        `create_dataset(name, data=array)` (created and linked, then written) and `attrs` set."""
        dataset = _Dataset(self, array)
        if not attrs:
            dataset.write_first_element(self)
        self.groups[group].link(name.encode(), dataset.address)
        if attrs:
            dataset.write_first_element(self)
        for key, value in (attrs or {}).items():
            dataset.add_string_attribute(self, key, value)
        return dataset

    def pieces(self) -> list[tuple[int, bytes]]:
        root = self.root
        superblock = b"\x89HDF\r\n\x1a\n" + bytes([0, 0, 0, 0, 0, 8, 8, 0]) + struct.pack("<HHI", _LEAF_K, _NODE_K, 0)
        superblock += struct.pack("<QQQQ", 0, _UNDEFINED, self.space.end, _UNDEFINED)
        superblock += struct.pack("<QQIIQQ", 0, root.address, 1, 0, root.tree.address, root.heap.address)
        return [(0, superblock)] + [piece for o in self.objects for piece in o.pieces()]


def _ascii_name(name: str) -> bool:
    return name.isascii() and "/" not in name and name not in ("", ".")


def _covered_attributes(attrs: dict | None) -> bool:
    """At most one attribute, an ASCII string under an ASCII name (Keras' `name` and `dtype`)."""
    return not attrs or (
        len(attrs) == 1 and all(_ascii_name(k) and isinstance(v, str) and v.isascii() for k, v in attrs.items())
    )


def _covered_array(array: np.ndarray) -> bool:
    dtype = array.dtype
    return (
        dtype.isnative
        and dtype.byteorder in "=<|"
        and (
            (dtype.kind == "f" and dtype.itemsize in _FLOAT_BITS)
            or (dtype.kind in "iu" and dtype.itemsize in (1, 2, 4, 8))
            or (dtype.name == "bfloat16" and dtype.itemsize == 2)
        )
        and array.ndim <= _MAX_RANK
    )


def lay_out(steps: list[tuple]) -> tuple[int, list[tuple[int, np.ndarray]], list[tuple[int, bytes]]] | None:
    """The file h5py would write for `steps` -- ("group", path, attributes or None) and ("dataset",
    group path, name, array, attributes or None), in order -- through its file-object driver: (its size, the (offset,
    array) of each dataset with bytes, in order, and every other byte as (offset, bytes) pieces,
    the tensors' first elements left out); None for what this module does not replay."""
    file = _File()
    placed = []
    try:
        for step in steps:
            if step[0] == "group":
                _, path, attrs = step
                if not all(_ascii_name(part) for part in path.split("/")):
                    return None
                if not _covered_attributes(attrs):
                    return None
                if path in file.groups:
                    return None
                file.group(path, attrs)
            else:
                _, group, name, array, attrs = step
                if group not in file.groups or not _ascii_name(name) or not _covered_array(array):
                    return None
                if not _covered_attributes(attrs):
                    return None
                dataset = file.dataset(group, name, array, attrs)
                if array.nbytes:
                    placed.append((dataset.data_address, array))
    except (_NotCovered, ValueError):  # ValueError: a name twice in a group, which h5py refuses
        return None
    return file.space.end, placed, file.pieces()
