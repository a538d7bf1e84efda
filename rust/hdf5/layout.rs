//! The HDF5 file h5py writes for Keras weights (a `.keras` member, a `.weights.h5`, a legacy `.h5`),
//! laid out without h5py or libhdf5.
//!
//! A `.keras` member is written by stock through h5py's file-object driver with libhdf5's
//! defaults: superblock 0, old-style groups (a v1 B-tree of symbol-table nodes, names in a local
//! heap), v1 object headers (grown as `object_header` replays), contiguous datasets whose storage
//! is allocated at their first write, and each group's `name` attribute (and a bfloat16 dataset's
//! `dtype`) a variable-length string in a global heap collection. A legacy `.h5` adds the
//! attributes of `Value` (`model_config`, `layer_names`, `weight_names`, ...) to its groups.
//! That driver aggregates nothing: every allocation takes the smallest free section that fits
//! (metadata and raw data apart, as libhdf5's free-list map keeps them), else grows the file. Replaying libhdf5's allocations and its B-tree, heap and object header
//! rules gives the file's bytes without running it, so a first save of an architecture does not
//! wait for h5py. `lay_out` returns `NotCovered` for what it does not replay (h5py lays that out);
//! the Python tests hold it to h5py's bytes.
//!
//! libhdf5's metadata cache evicts (writes early) what it used least recently when full (1 MiB
//! at least) and, while its hit rate stays high, what went unused for three epochs of 50,000
//! accesses. The replay keeps no cache: it lays out what libhdf5 writes when nothing is evicted,
//! and tracks (`Recency`) how much metadata was touched, and how many cache accesses were made at
//! most, since each heap and global heap collection was last used. Where an eviction could show
//! in the file -- a local heap that moves after it may have been written (its old bytes stay), a
//! name whose padding would keep the free-block headers an evicted heap wrote, a collection an
//! eviction would have dropped from libhdf5's list of those with room -- it returns `NotCovered`
//! and h5py lays the file out. Both counts are conservative by design (whole groups, every group
//! on a path, a quarter of the smallest cache, twice the accesses libhdf5's own log showed),
//! not derived from libhdf5's code line by line: the tests hold them to h5py on plans built to
//! make the cache evict.

use std::collections::{HashMap, HashSet};

use super::object_header::{Grow, ObjectHeader};

/// The libhdf5 whose allocations this replays (the one h5py bundles).
pub const HDF5_VERSION: &str = "1.14.6";

const UNDEFINED: u64 = u64::MAX;
const META: usize = 0; // the free-list map's two kinds of space
const RAW: usize = 1;
const LEAF_K: usize = 4; // symbol-table node and group B-tree widths (superblock 0 defaults)
const NODE_K: usize = 16;
const SNOD_SIZE: u64 = 8 + 2 * LEAF_K as u64 * 40;
const BTREE_SIZE: u64 = 24 + 2 * NODE_K as u64 * 16 + 8;
const HEAP_PREFIX: u64 = 32;
const HEAP_HINT: u64 = 88;
const HEAP_FREE_MIN: u64 = 16;
const GROUP_HEADER: u64 = 40; // prefix + the symbol-table message
const SYMBOL_TABLE: u16 = 0x11;
const ATTRIBUTE: u16 = 0x0C;
const DATASET_HEADER: usize = 16 + 256; // prefix + H5D's minimum header size
const GHEAP_MIN: u64 = 4096;
const GHEAP_OBJECT: u64 = 16;
const GHEAP_HEADER: u64 = 16;
const GHEAP_MAX: u64 = 65536;
const CWFS_MAX: usize = 16;
const CWFS_LISTED: usize = 256; // collections the replay's list holds, those libhdf5 may not list included
const SPLIT_RATIOS: [f64; 3] = [0.1, 0.5, 0.9]; // left-most, middle, right-most B-tree node
/// Bytes of metadata touched since an object's last use (each object counted once, plus the
/// object itself) past which libhdf5's metadata cache may have evicted it, so written it early.
/// The cache evicts what it used least recently when full (1 MiB at least); it writes dirty
/// objects, least recently used first, once they fill most of it (~0.7 MiB). A touch of a group
/// counts all of it (header, heap, every B-tree and symbol-table node) and every group above it;
/// a quarter of the smallest cache leaves room for what is not counted.
const MAYBE_EVICTED: u64 = 256 << 10;
/// Cache accesses since an object's last use from which the cache's age-out may have evicted it,
/// however few bytes were touched: at the end of each epoch of 50,000 accesses, while its hit
/// rate is high, H5C evicts what lies below the epoch marker it set three epochs before
/// (`H5C__autoadjust__ageout`), what went unused for 150,000 accesses. Two epochs leave a margin.
/// The accesses are counted as `FRESH_METADATA` counts them (a review built plans of deep paths
/// and many small attributes that age entries out over ~100 KB of metadata).
const MAYBE_AGED_OUT: u64 = 100_000;
/// Before then nothing can have been evicted or written early: the cache starts at 2 MiB and
/// only grows during its first epoch of 50,000 accesses (H5C's `initial_size`, `epoch_length`),
/// evicting only past its size and writing back only once less than 1 % of it is clean or
/// empty. So while the file's metadata (all it allocated but tensors, an upper bound of what the
/// cache holds) stays under 1.5 MiB and fewer than 50,000 accesses can have been made, counting
/// `ACCESSES_PER_STEP`, `ACCESSES_PER_GROUP` for each group on its path and `ACCESSES_PER_STRING`
/// (libhdf5's cache log showed at most half of that on any step: an array of 3,000 strings),
/// `Recency` is not asked.
const FRESH_METADATA: u64 = 3 << 19;
const FRESH_ACCESSES: u64 = 50_000;
const ACCESSES_PER_STEP: u64 = 100;
const ACCESSES_PER_GROUP: u64 = 50;
const ACCESSES_PER_STRING: u64 = 2;
/// Attributes a group may hold. Each new one costs libhdf5 about one cache access per earlier
/// one (its header's chunks), which `ACCESSES_PER_STEP` does not count past a few tens. Keras
/// sets at most a handful per group.
const MAX_ATTRIBUTES: usize = 32;
/// The most touches `Recency` is made for (2 x 64 MiB of sums and access counts).
const MAX_TOUCHES: usize = 1 << 23;
/// The dataspace message still fits the minimum header with the other messages.
pub const MAX_RANK: usize = 8;

/// Why a plan is left to h5py.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotCovered(pub String);

type Covered<T> = Result<T, NotCovered>;

fn not_covered<T>(why: impl Into<String>) -> Covered<T> {
    Err(NotCovered(why.into()))
}

/// A dataset's element type, as numpy names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    Float(u8),
    Signed(u8),
    Unsigned(u8),
    /// Opaque words with no tag: how h5py stores bfloat16.
    Opaque(u8),
}

impl Element {
    /// From numpy's dtype `kind` and `itemsize`; None for what is not replayed.
    pub fn from_numpy(kind: char, size: u8) -> Option<Self> {
        match (kind, size) {
            ('f', 2 | 4 | 8) => Some(Self::Float(size)),
            ('i', 1 | 2 | 4 | 8) => Some(Self::Signed(size)),
            ('u', 1 | 2 | 4 | 8) => Some(Self::Unsigned(size)),
            ('V', 2) => Some(Self::Opaque(size)),
            _ => None,
        }
    }

    fn size(self) -> u64 {
        match self {
            Self::Float(s) | Self::Signed(s) | Self::Unsigned(s) | Self::Opaque(s) => s as u64,
        }
    }

    /// The datatype message's body.
    fn message(self) -> Vec<u8> {
        let size = self.size() as u32;
        let mut out = Vec::with_capacity(24);
        match self {
            Self::Opaque(_) => {
                out.extend([0x15, 0, 0, 0]);
                out.extend(size.to_le_bytes());
            }
            Self::Float(s) => {
                // (sign bit, exponent location, exponent bits, mantissa bits, bias) per IEEE width
                let (sign, exponent_at, exponent_bits, mantissa_bits, bias): (u8, u8, u8, u8, u32) = match s {
                    2 => (15, 10, 5, 10, 15),
                    4 => (31, 23, 8, 23, 127),
                    _ => (63, 52, 11, 52, 1023),
                };
                out.extend([0x11, 0x20, sign, 0]);
                out.extend(size.to_le_bytes());
                out.extend(0u16.to_le_bytes());
                out.extend((size as u16 * 8).to_le_bytes());
                out.extend([exponent_at, exponent_bits, 0, mantissa_bits]);
                out.extend(bias.to_le_bytes());
            }
            Self::Signed(_) | Self::Unsigned(_) => {
                let signed = if matches!(self, Self::Signed(_)) { 0x08 } else { 0 };
                out.extend([0x10, signed, 0, 0]);
                out.extend(size.to_le_bytes());
                out.extend(0u16.to_le_bytes());
                out.extend((size as u16 * 8).to_le_bytes());
            }
        }
        out
    }
}

/// An attribute's value, as h5py stores the Python value Keras gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Variable-length strings in the global heap: a `str` (UTF-8) or `bytes` (ASCII) when
    /// `scalar`, else a list of `bytes` (a 1-D array).
    Strings {
        utf8: bool,
        scalar: bool,
        items: Vec<Vec<u8>>,
    },
    /// A 1-D numpy array of `S{width}`: NUL-padded fixed-length strings, `width` bytes each.
    Fixed { width: u64, items: Vec<Vec<u8>> },
    /// An empty list, which numpy makes an empty float64 array.
    Empty,
}

impl Value {
    /// h5py's `str`: one UTF-8 variable-length string.
    fn text(value: &str) -> Self {
        Value::Strings {
            utf8: true,
            scalar: true,
            items: vec![value.as_bytes().to_vec()],
        }
    }
}

/// One call of the plan, in the order stock makes them.
#[derive(Debug, Clone)]
pub enum Step {
    /// `require_group(path)` then `attrs[key] = value` for the attribute, if any.
    Group {
        path: String,
        attribute: Option<(String, String)>,
    },
    /// `group[name] = array`, or when `created` or with an attribute `create_dataset(name, ...)`
    /// then written (a `name` with '/' makes the groups above it first), and `attrs[key] = value`.
    Dataset {
        group: String,
        name: String,
        element: Element,
        shape: Vec<u64>,
        attribute: Option<(String, String)>,
        created: bool,
    },
    /// `h5[path].attrs[name] = value` on a group made before.
    Attribute { path: String, name: String, value: Value },
}

/// A laid-out file: its size, where each dataset with bytes has them (in plan order), and every
/// other byte: the contents of each stretch between the tensors, (start, bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    pub tensor_offsets: Vec<u64>,
    pub between: Vec<(u64, Vec<u8>)>,
}

fn align8(n: u64) -> u64 {
    (n + 7) & !7
}

fn pad8(out: &mut Vec<u8>) {
    out.resize(align8(out.len() as u64) as usize, 0);
}

fn u16le(n: u64) -> [u8; 2] {
    (n as u16).to_le_bytes()
}

fn u32le(n: u64) -> [u8; 4] {
    (n as u32).to_le_bytes()
}

/// An object header message: type, size, flags, then the body padded to 8 bytes.
fn message(kind: u16, body: &[u8], flags: u8) -> Vec<u8> {
    let mut padded = body.to_vec();
    pad8(&mut padded);
    let mut out = Vec::with_capacity(8 + padded.len());
    out.extend(kind.to_le_bytes());
    out.extend(u16le(padded.len() as u64));
    out.extend([flags, 0, 0, 0]);
    out.extend(padded);
    out
}

/// A block aggregator of the POSIX driver (H5MF's `meta_aggr`, `sdata_aggr`): small allocations of
/// a kind are cut from the front of a 2 KiB block; address 0 when it has none.
#[derive(Default, Clone, Copy)]
struct Aggregator {
    addr: u64,
    size: u64,
    total: u64,
}

const AGGREGATOR_BLOCK: u64 = 2048; // H5F_ACS_META_BLOCK_SIZE and H5F_ACS_SDATA_BLOCK_SIZE defaults

/// How a free section leaves the free-space manager (H5MF_shrink_type_t).
enum Shrink {
    Eoa,
    IntoAggregator,
}

/// H5MF: free sections per kind (smallest fit, lowest address first, as H5FS's size-ordered bins
/// give them), merged when freed and given back when they end the file; with aggregation (the
/// POSIX driver), also its two block aggregators, which absorb the sections beside them.
#[derive(Default)]
struct Space {
    end: u64,
    free: [Vec<(u64, u64)>; 2], // (address, size) sections of each kind; their order does not matter
    managed: [bool; 2],         // whether the kind's free-space manager has started
    aggregators: Option<[Aggregator; 2]>,
}

impl Space {
    fn aggregating() -> Self {
        Space {
            aggregators: Some([Aggregator::default(); 2]),
            ..Space::default()
        }
    }

    /// H5MF_alloc: a free section, else the aggregator, else the end of the file.
    fn alloc(&mut self, kind: usize, size: u64) -> u64 {
        let best = (self.free[kind].iter().enumerate())
            .filter(|(_, s)| s.1 >= size)
            .min_by_key(|(_, s)| (s.1, s.0))
            .map(|(i, _)| i);
        if let Some(i) = best {
            let (address, len) = self.free[kind].swap_remove(i);
            if len > size {
                self.add_section(kind, address + size, len - size);
            }
            return address;
        }
        if self.aggregators.is_some() {
            return self.alloc_aggregated(kind, size);
        }
        self.end += size;
        self.end - size
    }

    /// H5MF__aggr_alloc (no alignment).
    fn alloc_aggregated(&mut self, kind: usize, size: u64) -> u64 {
        let eoa = self.end;
        let mut a = self.aggregator(kind);
        if size <= a.size {
            let at = a.addr;
            a.addr += size;
            a.size -= size;
            self.set_aggregator(kind, a);
            return at;
        }
        let at_eoa = a.addr > 0 && a.addr + a.size == self.end;
        if size >= AGGREGATOR_BLOCK {
            if at_eoa {
                // The file grows past the block; the block moves behind the new space.
                self.end += size;
                let at = a.addr;
                a.addr += size;
                a.total += size;
                self.set_aggregator(kind, a);
                return at;
            }
            self.release_other_aggregator(1 - kind, eoa);
            self.end += size;
            return self.end - size;
        }
        if at_eoa {
            self.end += AGGREGATOR_BLOCK;
            a.size += AGGREGATOR_BLOCK;
            a.total += AGGREGATOR_BLOCK;
        } else {
            self.release_other_aggregator(1 - kind, eoa);
            let block = self.end;
            self.end += AGGREGATOR_BLOCK;
            if a.size > 0 {
                self.free_space(kind, a.addr, a.size); // the old block's rest
            }
            a = Aggregator {
                addr: block,
                size: AGGREGATOR_BLOCK,
                total: AGGREGATOR_BLOCK,
            };
        }
        let at = a.addr;
        a.addr += size;
        a.size -= size;
        self.set_aggregator(kind, a);
        at
    }

    fn aggregator(&self, kind: usize) -> Aggregator {
        self.aggregators.map_or_else(Aggregator::default, |a| a[kind])
    }

    fn set_aggregator(&mut self, kind: usize, value: Aggregator) {
        if let Some(a) = &mut self.aggregators {
            a[kind] = value;
        }
    }

    /// The other aggregator gives its rest back when it ends the file and has handed out more
    /// than a block since it started.
    fn release_other_aggregator(&mut self, other: usize, eoa: u64) {
        let o = self.aggregator(other);
        if o.size > 0 && o.addr + o.size == eoa && o.total > o.size && o.total - o.size >= AGGREGATOR_BLOCK {
            self.end = o.addr;
            self.set_aggregator(other, Aggregator::default());
        }
    }

    /// H5MF_xfree: given back to the end of the file or an aggregator if it touches them before
    /// the kind's free-space manager starts, else a section of it.
    fn free_space(&mut self, kind: usize, address: u64, size: u64) {
        if size == 0 {
            return;
        }
        if !self.managed[kind] {
            if let Some(how) = self.can_shrink(kind, address, size, false) {
                self.shrink(kind, address, size, how, false);
                return;
            }
            self.managed[kind] = true;
        }
        self.add_section(kind, address, size);
    }

    /// H5FS_sect_add of returned space: merged with its neighbours, then shrunk away while it
    /// can be, each time trying the last section after it.
    fn add_section(&mut self, kind: usize, mut address: u64, mut size: u64) {
        loop {
            let sections = &mut self.free[kind];
            let mut merged = false;
            if let Some(i) = sections.iter().position(|s| s.0 + s.1 == address) {
                let (at, len) = sections.swap_remove(i);
                (address, size, merged) = (at, size + len, true);
            }
            if let Some(i) = sections.iter().position(|s| address + size == s.0) {
                size += sections.swap_remove(i).1;
                merged = true;
            }
            if !merged {
                break;
            }
        }
        let mut section = Some((address, size));
        let mut listed = false; // the section is the last one of the list, tried after a shrink
        while let Some((at, len)) = section {
            let Some(how) = self.can_shrink(kind, at, len, false) else {
                break;
            };
            if listed {
                self.free[kind].retain(|&s| s != (at, len));
                listed = false;
            }
            section = self.shrink(kind, at, len, how, true);
            if section.is_none() {
                section = self.free[kind].iter().copied().max();
                listed = section.is_some();
            }
        }
        if let (Some(s), false) = (section, listed) {
            self.free[kind].push(s);
        }
    }

    /// H5MF__sect_simple_can_shrink: the section ends the file, or touches the kind's aggregator.
    fn can_shrink(&self, kind: usize, address: u64, size: u64, eoa_only: bool) -> Option<Shrink> {
        if address + size == self.end {
            return Some(Shrink::Eoa);
        }
        let a = self.aggregators?[kind];
        let touches = address + size == a.addr || a.addr + a.size == address;
        (!eoa_only && touches).then_some(Shrink::IntoAggregator)
    }

    /// H5MF__sect_simple_shrink: returns the section if it absorbed the aggregator instead.
    fn shrink(&mut self, kind: usize, address: u64, size: u64, how: Shrink, allow_absorb: bool) -> Option<(u64, u64)> {
        if let Shrink::Eoa = how {
            self.end = address;
            return None;
        }
        let mut a = self.aggregator(kind);
        if a.size + size >= AGGREGATOR_BLOCK && allow_absorb {
            let start = if address + size == a.addr {
                address
            } else {
                address - a.size
            };
            self.set_aggregator(kind, Aggregator::default());
            return Some((start, size + a.size));
        }
        if address + size == a.addr {
            a.addr -= size;
            a.size += size;
            a.total -= a.total.min(size);
        } else {
            a.size += size;
        }
        self.set_aggregator(kind, a);
        None
    }

    /// H5MF_try_extend: at the end of the file, into the aggregator the block ends at, or into
    /// the free section that follows it.
    fn try_extend(&mut self, kind: usize, address: u64, size: u64, extra: u64) -> bool {
        let end = address + size;
        if end == self.end {
            self.end += extra;
            return true;
        }
        let mut a = self.aggregator(kind);
        if self.aggregators.is_some() && end == a.addr {
            if self.end == a.addr + a.size {
                if extra > (0.1f32 * a.size as f32) as u64 {
                    let more = extra.max(AGGREGATOR_BLOCK); // the block grows at the end of the file
                    self.end += more;
                    a.total += more;
                    a.size += more;
                }
                a.size -= extra;
                a.addr += extra;
                self.set_aggregator(kind, a);
                return true;
            }
            if a.size >= extra {
                a.size -= extra;
                a.addr += extra;
                self.set_aggregator(kind, a);
                return true;
            }
        }
        let found = self.free[kind].iter().position(|s| s.0 == end && s.1 >= extra);
        found
            .inspect(|&i| {
                let section = &mut self.free[kind][i];
                if section.1 == extra {
                    self.free[kind].swap_remove(i);
                } else {
                    section.0 += extra;
                    section.1 -= extra;
                }
            })
            .is_some()
    }

    /// H5MF__close_aggrfs: the aggregators' rest given back (the later one first), then the
    /// sections and aggregators that end the file, until none does.
    fn close(&mut self) {
        let Some([meta, raw]) = self.aggregators else {
            return;
        };
        let order = if meta.addr < raw.addr { [1, 0] } else { [0, 1] };
        for kind in order {
            let a = self.aggregator(kind);
            self.set_aggregator(kind, Aggregator::default());
            self.free_space(kind, a.addr, a.size);
        }
        loop {
            let mut shrank = false;
            for kind in 0..2 {
                let last = self.free[kind].iter().copied().max();
                if let Some((at, len)) = last.filter(|&(at, len)| at + len == self.end) {
                    self.free[kind].retain(|&s| s != (at, len));
                    self.end = at;
                    shrank = true;
                }
            }
            for kind in 0..2 {
                let a = self.aggregator(kind);
                if a.size > 0 && a.addr + a.size == self.end {
                    self.end = a.addr;
                    self.set_aggregator(kind, Aggregator::default());
                    shrank = true;
                }
            }
            if !shrank {
                return;
            }
        }
    }
}

/// What the metadata cache may have evicted: each object's last touch, and the bytes of the objects
/// touched since any time, each counted once at its latest touch (the LRU list's view). A Fenwick
/// tree of sizes indexed by touch time, sized for the plan's touches.
struct Recency {
    sums: Vec<u64>, // wrapping: a moved object's size is taken back from its old time
    total: u64,
    now: usize,
    accesses: u64,         // at most this many cache accesses made so far (`count`)
    accesses_at: Vec<u64>, // `accesses` at each touch time
}

/// An object's (last touch time, size then); time 0 is never.
type Stamp = (usize, u64);

impl Recency {
    fn new(touches: usize) -> Self {
        Recency {
            sums: vec![0; touches + 1],
            total: 0,
            now: 0,
            accesses: 0,
            accesses_at: vec![0; touches + 1],
        }
    }

    /// Counts a step's cache accesses (an upper bound), before its touches.
    fn count(&mut self, accesses: u64) {
        self.accesses = self.accesses.saturating_add(accesses);
    }

    fn add(&mut self, mut at: usize, size: u64) {
        self.total = self.total.wrapping_add(size);
        while at < self.sums.len() {
            self.sums[at] = self.sums[at].wrapping_add(size);
            at += at & at.wrapping_neg();
        }
    }

    fn touch(&mut self, stamp: &mut Stamp, size: u64) -> Covered<()> {
        if self.now + 1 >= self.sums.len() {
            return not_covered("more metadata touches than the plan was counted for");
        }
        if stamp.0 > 0 {
            self.add(stamp.0, stamp.1.wrapping_neg());
        }
        self.now += 1;
        self.add(self.now, size);
        self.accesses_at[self.now] = self.accesses;
        *stamp = (self.now, size);
        Ok(())
    }

    /// Bytes of the objects touched after `time`.
    fn since(&self, time: usize) -> u64 {
        let (mut at, mut before) = (time, 0u64);
        while at > 0 {
            before = before.wrapping_add(self.sums[at]);
            at &= at - 1;
        }
        self.total.wrapping_sub(before)
    }

    fn maybe_evicted(&self, time: usize, size: u64) -> bool {
        self.since(time) + size > MAYBE_EVICTED || self.accesses - self.accesses_at[time] >= MAYBE_AGED_OUT
    }
}

/// What libhdf5 writes into each free block of a local heap when it writes the heap, and where:
/// the next block's offset (1 for none) and the block's size.
fn free_headers(free: &[(u64, u64)]) -> impl Iterator<Item = (usize, [u8; 16])> + '_ {
    free.iter().enumerate().map(|(i, &(offset, size))| {
        let following = free.get(i + 1).map_or(1, |next| next.0);
        let mut header = [0u8; 16];
        header[..8].copy_from_slice(&following.to_le_bytes());
        header[8..].copy_from_slice(&size.to_le_bytes());
        (offset as usize, header)
    })
}

/// A group's names (H5HL): first-fit free list, doubled when full, moved when it cannot grow in place.
struct LocalHeap {
    address: u64,
    data_address: u64,
    data: Vec<u8>,
    free: Vec<(u64, u64)>, // (offset, size), the list's head first
    used: usize,           // the `Recency` time of the last name put in
    /// The bytes an early write may have left nonzero where the replay has zeros: free-block
    /// headers written into the free space, kept by later names' padding. One eviction's headers
    /// can hide another's, so each possible eviction adds its own (empty until the first).
    tainted: Vec<bool>,
    maybe_written: bool, // the block may have been written where it is now
}

impl LocalHeap {
    fn new(space: &mut Space, now: usize) -> Self {
        let address = space.alloc(META, HEAP_PREFIX + HEAP_HINT);
        Self {
            address,
            data_address: address + HEAP_PREFIX,
            data: vec![0; HEAP_HINT as usize],
            free: vec![(0, HEAP_HINT)],
            used: now,
            tainted: Vec::new(),
            maybe_written: false,
        }
    }

    fn size(&self) -> u64 {
        HEAP_PREFIX + self.data.len() as u64
    }

    /// The cache may have evicted the heap since its last name: its block written where it is,
    /// with free-block headers in its free space.
    fn maybe_evicted(&mut self) {
        self.maybe_written = true;
        self.tainted.resize(self.data.len(), false);
        for (at, header) in free_headers(&self.free) {
            for (tainted, byte) in self.tainted[at..at + 16].iter_mut().zip(header) {
                *tainted |= byte != 0;
            }
        }
    }

    /// Stores `name` and its NUL at time `now`; returns its offset. Not covered when the block may
    /// have been written early and then moves (its old bytes would stay in the file).
    fn insert(&mut self, space: &mut Space, name: &[u8], now: usize) -> Covered<u64> {
        self.used = now;
        let need = align8(name.len() as u64 + 1);
        let mut found = None;
        let mut last: Option<usize> = None; // the block of the highest offset looked at
        for i in 0..self.free.len() {
            let (at, size) = self.free[i];
            if size > need && size - need >= HEAP_FREE_MIN {
                found = Some(at);
                self.free[i] = (at + need, size - need);
                break;
            }
            if size == need {
                found = Some(at);
                self.free.remove(i);
                break;
            }
            if last.is_none_or(|l| self.free[l].0 < at) {
                last = Some(i);
            }
        }
        let offset = match found {
            Some(offset) => offset,
            None => self.grow(space, need, last)?,
        };
        let at = offset as usize;
        self.data[at..at + name.len()].copy_from_slice(name);
        self.data[at + name.len()] = 0;
        if let Some(written) = self.tainted.get_mut(at..at + name.len() + 1) {
            written.fill(false); // the name and its NUL, not its padding
        }
        Ok(offset)
    }

    fn grow(&mut self, space: &mut Space, need: u64, last: Option<usize>) -> Covered<u64> {
        let old = self.data.len() as u64;
        let tail = last.filter(|&l| self.free[l].0 + self.free[l].1 == old);
        let mut more = need.max(old);
        if tail.is_none() && more < need + HEAP_FREE_MIN {
            more = need;
        }
        if !space.try_extend(META, self.data_address, old, more) {
            if self.maybe_written {
                return not_covered("a local heap the metadata cache may have written early moves");
            }
            space.free_space(META, self.data_address, old);
            self.data_address = space.alloc(META, old + more);
        }
        self.data.resize((old + more) as usize, 0);
        if !self.tainted.is_empty() {
            self.tainted.resize((old + more) as usize, false);
        }
        if let Some(l) = tail {
            let block = &mut self.free[l];
            let offset = block.0;
            block.0 += need;
            block.1 += more - need;
            if block.1 < HEAP_FREE_MIN {
                self.free.remove(l);
            }
            return Ok(offset);
        }
        if more - need >= HEAP_FREE_MIN {
            self.free.insert(0, (old + need, more - need));
        }
        Ok(old)
    }

    /// Whether no early write can have left a byte the replay lacks: every tainted byte is a
    /// name's or is rewritten by the free-block headers written when the file closes.
    fn evictions_leave_no_trace(&self) -> bool {
        let mut tainted = self.tainted.clone();
        for &(offset, _) in &self.free {
            if let Some(header) = tainted.get_mut(offset as usize..offset as usize + 16) {
                header.fill(false);
            }
        }
        !tainted.contains(&true)
    }

    fn name(&self, offset: u64) -> &[u8] {
        let rest = &self.data[offset as usize..];
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    fn pieces(&self, out: &mut Vec<(u64, Vec<u8>)>) {
        let mut data = self.data.clone();
        for (at, header) in free_headers(&self.free) {
            data[at..at + 16].copy_from_slice(&header);
        }
        let head = self.free.first().map_or(1, |f| f.0);
        let mut prefix = b"HEAP\0\0\0\0".to_vec();
        for n in [self.data.len() as u64, head, self.data_address] {
            prefix.extend(n.to_le_bytes());
        }
        out.push((self.address, prefix));
        out.push((self.data_address, data));
    }
}

/// A symbol-table entry: (name offset in the heap, object header, the (B-tree, heap) of a group).
type Entry = (u64, u64, Option<(u64, u64)>);

struct SymbolNode {
    address: u64,
    entries: Vec<Entry>,
}

impl SymbolNode {
    fn pieces(&self, out: &mut Vec<(u64, Vec<u8>)>) {
        let mut data = b"SNOD\x01\x00".to_vec();
        data.extend(u16le(self.entries.len() as u64));
        for &(name, header, group) in &self.entries {
            data.extend(name.to_le_bytes());
            data.extend(header.to_le_bytes());
            match group {
                None => data.extend([0u8; 24]),
                Some((tree, heap)) => {
                    // a group's entry caches where its symbol table is
                    data.extend(1u32.to_le_bytes());
                    data.extend(0u32.to_le_bytes());
                    data.extend(tree.to_le_bytes());
                    data.extend(heap.to_le_bytes());
                }
            }
        }
        data.resize(SNOD_SIZE as usize, 0);
        out.push((self.address, data));
    }
}

/// A node of a group's B-tree; children index `File::trees` (level > 0) or `File::leaves`.
struct TreeNode {
    address: u64,
    level: u8,
    keys: Vec<u64>, // heap offsets of names: child i holds names in (keys[i], keys[i + 1]]
    children: Vec<usize>,
    left: u64,
    right: u64,
}

impl TreeNode {
    fn pieces(&self, out: &mut Vec<(u64, Vec<u8>)>, address_of: impl Fn(usize) -> u64) {
        let mut data = b"TREE\x00".to_vec();
        data.push(self.level);
        data.extend(u16le(self.children.len() as u64));
        data.extend(self.left.to_le_bytes());
        data.extend(self.right.to_le_bytes());
        for (key, &child) in self.keys.iter().zip(&self.children) {
            data.extend(key.to_le_bytes());
            data.extend(address_of(child).to_le_bytes());
        }
        if !self.children.is_empty() {
            data.extend(self.keys[self.children.len()].to_le_bytes()); // keys: one more
        }
        data.resize(BTREE_SIZE as usize, 0);
        out.push((self.address, data));
    }
}

const VLEN_STRING: [u8; 20] = [
    0x19, 1, 1, 0, 16, 0, 0, 0, // variable-length string of 16-byte references
    0x10, 0, 0, 0, 1, 0, 0, 0, 0, 0, 8, 0, // its base: 1-byte unsigned characters
];

/// The body size of the message of `attrs[name] = "..."`.
fn string_attribute_size(name: &str) -> u64 {
    attribute_body(name, &Value::text(""), &[]).len() as u64
}

/// An attribute message's body (version 1) for `attrs[name] = value`: each variable-length
/// string's global heap (collection, index) from `references` (zero when not yet written).
fn attribute_body(name: &str, value: &Value, references: &[(u64, u64)]) -> Vec<u8> {
    let (datatype, shape, data) = match value {
        Value::Strings { utf8, scalar, items } => {
            let mut datatype = VLEN_STRING.to_vec();
            datatype[2] = *utf8 as u8;
            let mut data = Vec::with_capacity(16 * items.len());
            for (i, item) in items.iter().enumerate() {
                let (collection, index) = references.get(i).copied().unwrap_or((0, 0));
                data.extend(u32le(item.len() as u64));
                data.extend(collection.to_le_bytes());
                data.extend(u32le(index));
            }
            (datatype, (!scalar).then_some(items.len() as u64), data)
        }
        Value::Fixed { width, items } => {
            let mut datatype = vec![0x13, 1, 0, 0]; // a string, NUL-padded, ASCII
            datatype.extend(u32le(*width));
            let mut data = Vec::with_capacity((*width as usize) * items.len());
            for item in items {
                data.extend(item);
                data.resize(data.len() + (*width as usize).saturating_sub(item.len()), 0);
            }
            (datatype, Some(items.len() as u64), data)
        }
        Value::Empty => (Element::Float(8).message(), Some(0), Vec::new()),
    };
    let rank = shape.is_some() as u8;
    let mut space = vec![1, rank, rank, 0, 0, 0, 0, 0]; // a 1-D one has its maximum too
    if let Some(n) = shape {
        space.extend(n.to_le_bytes());
        space.extend(n.to_le_bytes());
    }
    let mut body = vec![1, 0];
    body.extend(u16le(name.len() as u64 + 1));
    body.extend(u16le(datatype.len() as u64));
    body.extend(u16le(space.len() as u64));
    body.extend(name.as_bytes());
    body.push(0);
    for part in [&datatype, &space, &data] {
        pad8(&mut body);
        body.extend(part);
    }
    body
}

/// The order in which libhdf5 writes `n` variable-length strings (H5T__conv_vlen): in place,
/// each growing from an 8-byte pointer to a 16-byte reference, so it converts the last elements
/// that overlap no unconverted one (forwards), and the last few backwards.
fn conversion_order(n: usize) -> Vec<usize> {
    let mut order = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let safe = left - (left * 8).div_ceil(16);
        if safe < 2 {
            order.extend((0..left).rev());
            break;
        }
        order.extend(left - safe..left);
        left -= safe;
    }
    order
}

/// File space for object headers (libhdf5's object-header allocations are metadata).
struct HeaderSpace<'a>(&'a mut Space);

impl Grow for HeaderSpace<'_> {
    fn try_extend(&mut self, address: u64, size: u64, extra: u64) -> bool {
        self.0.try_extend(META, address, size, extra)
    }

    fn alloc(&mut self, size: u64) -> u64 {
        self.0.alloc(META, size)
    }
}

/// An old-style group: header (its symbol-table message, then its attributes), B-tree root, local heap.
struct Group {
    address: u64,
    header: ObjectHeader,
    tree: usize,
    heap: LocalHeap,
    parent: Option<usize>,
    attributes: usize,
    nodes: u64, // B-tree and symbol-table nodes made for it
    leaves: u64,
    stamp: Stamp,
}

impl Group {
    /// All of it, as `Recency` counts a touch.
    fn size(&self) -> u64 {
        self.header.size() + self.heap.size() + self.nodes * BTREE_SIZE + self.leaves * SNOD_SIZE
    }
}

struct Collection {
    address: u64,
    size: u64,
    objects: Vec<Vec<u8>>,
    free: u64,
    stamp: Stamp,
    /// libhdf5 may have dropped it from its list of collections with free space (`list_with_space`).
    maybe_dropped: bool,
}

impl Collection {
    fn pieces(&self, out: &mut Vec<(u64, Vec<u8>)>) {
        let mut data = b"GCOL\x01\0\0\0".to_vec();
        data.extend(self.size.to_le_bytes());
        for (index, raw) in self.objects.iter().enumerate() {
            data.extend(u16le(index as u64 + 1));
            data.extend([0u8; 6]);
            data.extend((raw.len() as u64).to_le_bytes());
            data.extend(raw);
            pad8(&mut data);
        }
        if self.free >= GHEAP_OBJECT {
            data.extend([0u8; 8]);
            data.extend(self.free.to_le_bytes());
        }
        data.resize(self.size as usize, 0);
        out.push((self.address, data));
    }
}

struct Dataset {
    address: u64,
    element: Element,
    shape: Vec<u64>,
    data_address: u64,
    attribute: Option<Vec<u8>>,
}

impl Dataset {
    fn nbytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.element.size()
    }

    /// The header's bytes before and after the data address in its layout message.
    fn fixed(&self) -> (Vec<u8>, Vec<u8>) {
        let mut space = vec![
            1,
            self.shape.len() as u8,
            if self.shape.is_empty() { 0 } else { 1 },
            0,
            0,
            0,
            0,
            0,
        ];
        for _ in 0..2 {
            if !self.shape.is_empty() {
                space.extend(self.shape.iter().flat_map(|d| d.to_le_bytes())); // dimensions, then maxima
            }
        }
        let mut before = vec![1, 0];
        before.extend(5u16.to_le_bytes());
        before.extend(1u32.to_le_bytes());
        before.extend(u32le(DATASET_HEADER as u64 - 16));
        before.extend([0u8; 4]);
        before.extend(message(1, &space, 0));
        before.extend(message(3, &self.element.message(), 1));
        before.extend(message(5, &[2, 2, 2, 1, 0, 0, 0, 0], 1));
        before.extend([8, 0, 24, 0, 0, 0, 0, 0, 3, 1]); // contiguous layout, version 3
        let mut after = self.nbytes().to_le_bytes().to_vec();
        after.extend([0u8; 6]);
        (before, after)
    }

    fn pieces(&self, out: &mut Vec<(u64, Vec<u8>)>) {
        let (mut before, mut after) = self.fixed();
        let mut null = null_size(&before, &after);
        if let Some(attribute) = &self.attribute {
            // one message more, the null message shorter
            before[2..4].copy_from_slice(&6u16.to_le_bytes());
            after.extend(attribute);
            null -= attribute.len();
        }
        let mut header = before;
        header.extend(self.data_address.to_le_bytes());
        header.extend(after);
        header.extend([0, 0]);
        header.extend(u16le(null as u64));
        header.extend([0u8; 4]);
        header.resize(DATASET_HEADER, 0);
        out.push((self.address, header));
    }
}

/// The size of the null message that fills the rest of a dataset's header.
fn null_size(before: &[u8], after: &[u8]) -> usize {
    DATASET_HEADER - (before.len() + 8 + after.len()) - 8
}

/// What the file holds, in the order it was made (the order its bytes are written).
enum Object {
    Tree(usize),
    Leaf(usize),
    Group(usize),
    Collection(usize),
    Dataset(usize),
}

struct File {
    space: Space,
    objects: Vec<Object>,
    trees: Vec<TreeNode>,
    tree_at: HashMap<u64, usize>,
    leaves: Vec<SymbolNode>,
    groups: Vec<Group>,
    group_at: HashMap<String, usize>,
    collections: Vec<Collection>,
    /// H5HG's collections with free space (CWFS), most used first, as libhdf5 lists them when its
    /// metadata cache evicts none; the ones it may not list (`maybe_unlisted`) stay in place.
    with_space: Vec<usize>,
    datasets: Vec<Dataset>,
    recency: Recency,
    tensor_bytes: u64,
}

impl File {
    fn new(driver: Driver, touches: usize) -> Covered<Self> {
        let mut file = File {
            space: match driver {
                Driver::FileObject => Space::default(),
                Driver::Posix => Space::aggregating(),
            },
            objects: Vec::new(),
            trees: Vec::new(),
            tree_at: HashMap::new(),
            leaves: Vec::new(),
            groups: Vec::new(),
            group_at: HashMap::new(),
            collections: Vec::new(),
            with_space: Vec::new(),
            datasets: Vec::new(),
            recency: Recency::new(touches),
            tensor_bytes: 0,
        };
        file.space.alloc(META, 96); // the superblock
        let root = file.new_group(None)?;
        file.group_at.insert(String::new(), root);
        Ok(file)
    }

    /// Whether the metadata cache can have evicted an object last touched at `time` (see FRESH_METADATA).
    fn maybe_evicted(&self, time: usize, size: u64) -> bool {
        let metadata = self.space.end.saturating_sub(self.tensor_bytes);
        let fresh = metadata <= FRESH_METADATA && self.recency.accesses < FRESH_ACCESSES;
        !fresh && self.recency.maybe_evicted(time, size)
    }

    /// Touches `group` and every group above it (h5py may look a path up from the root), each all of it.
    fn touch_path(&mut self, group: usize) -> Covered<()> {
        let mut at = Some(group);
        while let Some(g) = at {
            let size = self.groups[g].size();
            self.recency.touch(&mut self.groups[g].stamp, size)?;
            at = self.groups[g].parent;
        }
        Ok(())
    }

    fn new_tree(&mut self, level: u8) -> usize {
        let address = self.space.alloc(META, BTREE_SIZE);
        let node = TreeNode {
            address,
            level,
            keys: vec![0],
            children: Vec::new(),
            left: UNDEFINED,
            right: UNDEFINED,
        };
        self.trees.push(node);
        let index = self.trees.len() - 1;
        self.objects.push(Object::Tree(index));
        self.tree_at.insert(address, index);
        index
    }

    fn new_leaf(&mut self) -> usize {
        let address = self.space.alloc(META, SNOD_SIZE);
        self.leaves.push(SymbolNode {
            address,
            entries: Vec::new(),
        });
        self.objects.push(Object::Leaf(self.leaves.len() - 1));
        self.leaves.len() - 1
    }

    fn new_group(&mut self, parent: Option<usize>) -> Covered<usize> {
        let address = self.space.alloc(META, GROUP_HEADER);
        let tree = self.new_tree(0);
        let mut heap = LocalHeap::new(&mut self.space, self.recency.now);
        heap.insert(&mut self.space, b"", self.recency.now)?;
        let mut table = self.trees[tree].address.to_le_bytes().to_vec();
        table.extend(heap.address.to_le_bytes());
        self.groups.push(Group {
            address,
            header: ObjectHeader::new(address, SYMBOL_TABLE, table),
            tree,
            heap,
            parent,
            attributes: 0,
            nodes: 1,
            leaves: 0,
            stamp: (0, 0),
        });
        let g = self.groups.len() - 1;
        let size = self.groups[g].size();
        self.recency.touch(&mut self.groups[g].stamp, size)?;
        self.objects.push(Object::Group(g));
        Ok(g)
    }

    /// H5HG with the file's list of collections with free space.
    fn global_heap_insert(&mut self, raw: &[u8]) -> Covered<(u64, u64)> {
        let need = GHEAP_OBJECT + align8(raw.len() as u64);
        let mut found = self.with_space.iter().position(|&c| self.collections[c].free >= need);
        if found.is_none() {
            // H5F_cwfs_find_free_heap: the first collection on the list that can grow in place
            // (at least doubling, to at most 64 KiB) grows.
            for (at, &c) in self.with_space.iter().enumerate() {
                let c = &mut self.collections[c];
                let extra = c.size.max(need - c.free);
                if c.size + extra <= GHEAP_MAX && self.space.try_extend(RAW, c.address, c.size, extra) {
                    c.size += extra;
                    c.free += extra;
                    found = Some(at);
                    break;
                }
            }
        }
        let collection = match found {
            Some(at) => {
                // A collection libhdf5 may not list: the object would go elsewhere, or the swap
                // below would pass a different neighbour. (Those before did not fit either way.)
                if self.maybe_unlisted(self.with_space[at]) || (at > 0 && self.maybe_unlisted(self.with_space[at - 1]))
                {
                    return not_covered("a global heap collection the metadata cache may have evicted");
                }
                if at > 0 {
                    self.with_space.swap(at - 1, at); // one step closer to the front
                }
                self.with_space[at.saturating_sub(1)]
            }
            None => {
                let size = align8(GHEAP_MIN.max(need + GHEAP_HEADER));
                let address = self.space.alloc(RAW, size);
                self.collections.push(Collection {
                    address,
                    size,
                    objects: Vec::new(),
                    free: size - GHEAP_HEADER,
                    stamp: (0, 0),
                    maybe_dropped: false,
                });
                let c = self.collections.len() - 1;
                self.objects.push(Object::Collection(c));
                self.list_with_space(c)?;
                c
            }
        };
        let c = &mut self.collections[collection];
        self.recency.touch(&mut c.stamp, c.size)?;
        c.objects.push(raw.to_vec());
        c.free -= need;
        Ok((c.address, c.objects.len() as u64))
    }

    /// Whether libhdf5 may not list `c` among the collections with free space: an evicted
    /// collection leaves its list, and a full list drops one for a new collection.
    fn maybe_unlisted(&self, c: usize) -> bool {
        let c = &self.collections[c];
        c.maybe_dropped || self.maybe_evicted(c.stamp.0, c.size)
    }

    /// H5F_cwfs_add: a new collection goes first on the list; a full list (16) drops for it its
    /// last collection with less free space than the new one has. A new collection is made only
    /// when no listed one fits, so it has more free space than each: the last one is dropped.
    /// Where evictions may have shortened libhdf5's list, whether it is full and which one it
    /// drops are not known: a collection it may have dropped stays in place, marked
    /// `maybe_dropped` (then never chosen, nor passed by a swap, without `NotCovered`).
    fn list_with_space(&mut self, c: usize) -> Covered<()> {
        if self.with_space.len() > CWFS_LISTED {
            return not_covered("more global heap collections than the replay keeps track of");
        }
        let free = self.collections[c].free;
        debug_assert!(self.with_space.iter().all(|&o| self.collections[o].free < free));
        if self.with_space.len() >= CWFS_MAX {
            let unsure: Vec<bool> = self.with_space.iter().map(|&o| self.maybe_unlisted(o)).collect();
            // The last collection libhdf5 surely lists: dropped when its list is surely full (then
            // it lists none of the others), maybe dropped when it can be full with none listed
            // after that one. With none sure, nothing sure changes.
            if let Some(last) = unsure.iter().rposition(|u| !u) {
                let sure = unsure.iter().filter(|u| !**u).count();
                let before = unsure[..last].iter().filter(|u| **u).count();
                if sure >= CWFS_MAX {
                    self.with_space.remove(last);
                } else if sure + before >= CWFS_MAX {
                    self.collections[self.with_space[last]].maybe_dropped = true;
                }
            }
        }
        self.with_space.insert(0, c);
        Ok(())
    }

    /// `attrs[name] = value` on a group: libhdf5 makes the message (where its object header puts
    /// it), then writes the value, variable-length strings into the global heap in order.
    fn group_attribute(&mut self, group: usize, name: &str, value: &Value) -> Covered<()> {
        let unwritten = attribute_body(name, value, &[]);
        if unwritten.len() >= 1 << 16 {
            return not_covered(format!("attribute '{name}': larger than an object header message"));
        }
        let header = &mut self.groups[group].header;
        if header
            .append(ATTRIBUTE, unwritten.clone(), &mut HeaderSpace(&mut self.space))
            .is_err()
        {
            return not_covered(format!("attribute '{name}': libhdf5 would move a whole chunk"));
        }
        let mut references = Vec::new();
        if let Value::Strings { items, .. } = value {
            references = vec![(0, 0); items.len()];
            for i in conversion_order(items.len()) {
                references[i] = self.global_heap_insert(&items[i])?;
            }
        }
        let body = attribute_body(name, value, &references);
        if !self.groups[group].header.rewrite(ATTRIBUTE, &unwritten, body) {
            return not_covered(format!("attribute '{name}': its message was not found again"));
        }
        Ok(())
    }

    fn group_pieces(&self, group: &Group, out: &mut Vec<(u64, Vec<u8>)>) {
        group.header.pieces(out);
        group.heap.pieces(out);
    }

    fn compare(&self, group: usize, name: &[u8], left: u64, right: u64) -> i32 {
        let heap = &self.groups[group].heap;
        if name <= heap.name(left) {
            -1
        } else if name > heap.name(right) {
            1
        } else {
            0
        }
    }

    /// H5G__stab_insert: H5B_insert of the name into `group`, splitting nodes as libhdf5 does.
    fn link(&mut self, group: usize, name: &[u8], entry: (u64, Option<(u64, u64)>)) -> Covered<()> {
        let heap = &self.groups[group].heap;
        if self.maybe_evicted(heap.used, heap.size()) {
            self.groups[group].heap.maybe_evicted();
        }
        self.touch_path(group)?;
        let (trees, leaves) = (self.trees.len(), self.leaves.len());
        let inserted = self.link_touched(group, name, entry);
        let g = &mut self.groups[group];
        g.nodes += (self.trees.len() - trees) as u64;
        g.leaves += (self.leaves.len() - leaves) as u64;
        inserted
    }

    fn link_touched(&mut self, group: usize, name: &[u8], entry: (u64, Option<(u64, u64)>)) -> Covered<()> {
        let root = self.groups[group].tree;
        let Some((middle, right)) = self.insert(group, root, name, entry)? else {
            return Ok(());
        };
        // The root split: its content moves, a new root takes its address.
        let level = self.trees[root].level;
        let moved = self.new_tree(level);
        let r = &mut self.trees[root];
        let (keys, children, left, right_sibling) = (
            std::mem::take(&mut r.keys),
            std::mem::take(&mut r.children),
            r.left,
            r.right,
        );
        let first = keys[0];
        let m = &mut self.trees[moved];
        (m.keys, m.children, m.left, m.right) = (keys, children, left, right_sibling);
        let moved_address = m.address;
        let right_node = &mut self.trees[right];
        right_node.left = moved_address;
        let last = right_node.keys[right_node.children.len()];
        let r = &mut self.trees[root];
        r.keys = vec![first, middle, last];
        r.children = vec![moved, right];
        r.level += 1;
        (r.left, r.right) = (UNDEFINED, UNDEFINED);
        Ok(())
    }

    /// H5B__insert_helper: returns (middle key, new right sibling) when `node` split.
    fn insert(
        &mut self,
        group: usize,
        node: usize,
        name: &[u8],
        entry: (u64, Option<(u64, u64)>),
    ) -> Covered<Option<(u64, usize)>> {
        let (mut low, mut high, mut cmp, mut i) = (0, self.trees[node].children.len(), -1, 0);
        while low < high && cmp != 0 {
            i = (low + high) / 2;
            let keys = &self.trees[node].keys;
            cmp = self.compare(group, name, keys[i], keys[i + 1]);
            if cmp < 0 {
                high = i;
            } else {
                low = i + 1;
            }
        }
        if self.trees[node].children.is_empty() {
            // the first name: the first leaf
            let leaf = self.new_leaf();
            let n = &mut self.trees[node];
            (n.children, n.keys, i) = (vec![leaf], vec![0, 0], 0);
        } else if cmp > 0 {
            i = self.trees[node].children.len() - 1;
        } else if cmp < 0 {
            i = 0;
        }
        let child = self.trees[node].children[i];
        let split = if self.trees[node].level > 0 {
            let split = self.insert(group, child, name, entry)?;
            let last = *self.trees[split.map_or(child, |s| s.1)]
                .keys
                .last()
                .expect("a node has keys");
            self.trees[node].keys[i + 1] = last;
            split
        } else {
            self.insert_in_leaf(group, child, name, entry, node, i)?
        };
        let Some((middle, new)) = split else {
            return Ok(None);
        };
        let (mut into, mut at, mut right) = (node, i, None);
        if self.trees[node].children.len() == 2 * NODE_K {
            let r = self.split(node, i);
            right = Some(r);
            let kept = self.trees[node].children.len();
            if i >= kept {
                (into, at) = (r, i - kept);
            }
        }
        self.trees[into].keys.insert(at + 1, middle);
        self.trees[into].children.insert(at + 1, new);
        Ok(right.map(|r| (self.trees[r].keys[0], r)))
    }

    /// H5B__split: the new right node takes the children past `nleft`.
    fn split(&mut self, node: usize, i: usize) -> usize {
        let two_k = 2 * NODE_K;
        let n = &self.trees[node];
        let ratio = SPLIT_RATIOS[if n.right == UNDEFINED {
            2
        } else if n.left == UNDEFINED {
            0
        } else {
            1
        }];
        let mut nleft = (two_k as f64 * ratio) as usize;
        if i < nleft && nleft == two_k {
            nleft -= 1;
        } else if i >= nleft && nleft == 0 {
            nleft += 1;
        }
        let right = self.new_tree(self.trees[node].level);
        let n = &mut self.trees[node];
        let keys = n.keys.split_off(nleft);
        n.keys.push(keys[0]); // the left node keeps its last right key
        let children = n.children.split_off(nleft);
        let (address, old_right) = (n.address, n.right);
        let right_address = self.trees[right].address;
        self.trees[node].right = right_address;
        let r = &mut self.trees[right];
        (r.keys, r.children, r.left, r.right) = (keys, children, address, old_right);
        if old_right != UNDEFINED {
            let neighbour = self.tree_at[&old_right];
            self.trees[neighbour].left = right_address;
        }
        right
    }

    /// H5G__node_insert: the name joins the heap, then the node, which splits in halves when full.
    fn insert_in_leaf(
        &mut self,
        group: usize,
        leaf: usize,
        name: &[u8],
        (header, table): (u64, Option<(u64, u64)>),
        node: usize,
        i: usize,
    ) -> Covered<Option<(u64, usize)>> {
        let entries = &self.leaves[leaf].entries;
        let heap = &self.groups[group].heap;
        let (mut low, mut high, mut at, mut cmp) = (0, entries.len(), 0, std::cmp::Ordering::Greater);
        let mut looked = false;
        while low < high {
            at = (low + high) / 2;
            looked = true;
            cmp = name.cmp(heap.name(entries[at].0));
            match cmp {
                std::cmp::Ordering::Equal => return not_covered("a name twice in a group, which h5py refuses"),
                std::cmp::Ordering::Less => high = at,
                std::cmp::Ordering::Greater => low = at + 1,
            }
        }
        if looked && cmp == std::cmp::Ordering::Greater {
            at += 1;
        }
        let offset = self.groups[group]
            .heap
            .insert(&mut self.space, name, self.recency.now)?;
        let entry = (offset, header, table);
        if self.leaves[leaf].entries.len() < 2 * LEAF_K {
            if at == self.leaves[leaf].entries.len() {
                self.trees[node].keys[i + 1] = offset;
            }
            self.leaves[leaf].entries.insert(at, entry);
            return Ok(None);
        }
        let right = self.new_leaf();
        let moved = self.leaves[leaf].entries.split_off(LEAF_K);
        self.leaves[right].entries = moved;
        let mut middle = self.leaves[leaf].entries[LEAF_K - 1].0;
        let into = if at <= LEAF_K {
            if at == LEAF_K {
                middle = offset;
            }
            leaf
        } else {
            at -= LEAF_K;
            if at == LEAF_K {
                self.trees[node].keys[i + 1] = offset;
            }
            right
        };
        self.leaves[into].entries.insert(at, entry);
        Ok(Some((middle, right)))
    }

    /// `require_group(path)` (missing parents first, as HDF5 makes them), then its attribute.
    fn group(&mut self, path: &str, attribute: Option<&(String, String)>) -> Covered<()> {
        let (parent, leaf) = path.rsplit_once('/').unwrap_or(("", path));
        if !self.group_at.contains_key(parent) {
            self.group(parent, None)?;
        }
        let parent = self.group_at[parent];
        let group = self.new_group(Some(parent))?;
        let table = (
            self.trees[self.groups[group].tree].address,
            self.groups[group].heap.address,
        );
        self.link(parent, leaf.as_bytes(), (self.groups[group].address, Some(table)))?;
        self.group_at.insert(path.to_owned(), group);
        if let Some((name, value)) = attribute {
            self.group_attribute(group, name, &Value::text(value))?;
        }
        Ok(())
    }

    /// `group[name] = array` (created, written, then linked), or when `created` or with an
    /// attribute `create_dataset(name, ...)` (created and linked, then written) and the attribute
    /// set. Returns the data's address if it has bytes.
    fn dataset(
        &mut self,
        group: usize,
        name: &str,
        element: Element,
        shape: &[u64],
        attribute: Option<&(String, String)>,
        created: bool,
    ) -> Covered<Option<u64>> {
        let address = self.space.alloc(META, DATASET_HEADER as u64);
        self.recency.touch(&mut (0, 0), DATASET_HEADER as u64)?; // made now, touched again only by h5py's close
        self.datasets.push(Dataset {
            address,
            element,
            shape: shape.to_vec(),
            data_address: UNDEFINED,
            attribute: None,
        });
        let d = self.datasets.len() - 1;
        self.objects.push(Object::Dataset(d));
        let nbytes = self.datasets[d].nbytes();
        // The first write allocates the storage (contiguous, late allocation).
        let first_write = |file: &mut Self| {
            if nbytes > 0 {
                file.datasets[d].data_address = file.space.alloc(RAW, nbytes);
                file.tensor_bytes += nbytes;
            }
        };
        let linked_first = created || attribute.is_some();
        if !linked_first {
            first_write(self);
        }
        self.link(group, name.as_bytes(), (address, None))?;
        if linked_first {
            first_write(self);
        }
        if let Some((key, value)) = attribute {
            // The message takes the front of the header's null message, which keeps the rest.
            let (before, after) = self.datasets[d].fixed();
            if 8 + string_attribute_size(key) + 8 > null_size(&before, &after) as u64 + 8 {
                return not_covered("the attribute does not fit the dataset's header");
            }
            let references = [self.global_heap_insert(value.as_bytes())?];
            let value = Value::text(value);
            self.datasets[d].attribute = Some(message(ATTRIBUTE, &attribute_body(key, &value, &references), 0));
        }
        Ok((nbytes > 0).then_some(self.datasets[d].data_address))
    }

    fn pieces(&self) -> Vec<(u64, Vec<u8>)> {
        let root = &self.groups[0];
        let mut superblock = b"\x89HDF\r\n\x1a\n".to_vec();
        superblock.extend([0, 0, 0, 0, 0, 8, 8, 0]);
        superblock.extend(u16le(LEAF_K as u64));
        superblock.extend(u16le(NODE_K as u64));
        superblock.extend([0u8; 4]);
        for n in [0, UNDEFINED, self.space.end, UNDEFINED, 0, root.address] {
            superblock.extend(n.to_le_bytes());
        }
        superblock.extend(1u32.to_le_bytes());
        superblock.extend(0u32.to_le_bytes());
        superblock.extend(self.trees[root.tree].address.to_le_bytes());
        superblock.extend(root.heap.address.to_le_bytes());
        let mut out = vec![(0, superblock)];
        for object in &self.objects {
            match *object {
                Object::Tree(t) => {
                    let child_address = |c: usize| {
                        if self.trees[t].level > 0 {
                            self.trees[c].address
                        } else {
                            self.leaves[c].address
                        }
                    };
                    self.trees[t].pieces(&mut out, child_address)
                }
                Object::Leaf(l) => self.leaves[l].pieces(&mut out),
                Object::Group(g) => self.group_pieces(&self.groups[g], &mut out),
                Object::Collection(c) => self.collections[c].pieces(&mut out),
                Object::Dataset(d) => self.datasets[d].pieces(&mut out),
            }
        }
        out
    }
}

/// A link name h5py makes of a str without turning the group into a new-style one.
fn plain_name(name: &str) -> bool {
    name.is_ascii() && !name.contains(['/', '\0']) && !name.is_empty() && name != "."
}

/// A value h5py stores as `Value` says: strings of ASCII (no NUL in a variable-length one, none empty).
fn plain_value(value: &Value) -> bool {
    match value {
        Value::Strings { items, scalar, .. } => {
            (if *scalar { items.len() == 1 } else { !items.is_empty() })
                && items.iter().all(|s| !s.is_empty() && s.is_ascii() && !s.contains(&0))
        }
        Value::Fixed { width, items } => {
            *width > 0 && !items.is_empty() && items.iter().all(|s| s.len() as u64 <= *width)
        }
        Value::Empty => true,
    }
}

fn plain_attribute(attribute: Option<&(String, String)>) -> bool {
    // an object header message's size is 16 bits: h5py refuses a longer one
    if attribute.is_some_and(|(key, _)| string_attribute_size(key) + 8 > u16::MAX as u64) {
        return false;
    }
    // h5py refuses a NUL inside a variable-length string
    attribute.is_none_or(|(key, value)| plain_name(key) && value.is_ascii() && !value.contains('\0'))
}

/// The libhdf5 file driver h5py writes through: a `.keras` member goes through its file-object
/// driver, which aggregates nothing; a `.weights.h5` file through the POSIX one (`sec2`), which
/// cuts small allocations out of 2 KiB blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    FileObject,
    Posix,
}

impl Step {
    /// The groups on the step's path (each may be made, or looked up) and the strings it stores.
    fn reach(&self) -> (usize, usize) {
        match self {
            Step::Group { path, .. } => (path.split('/').count(), 0),
            Step::Dataset { group, name, .. } => (group.split('/').count() + name.split('/').count(), 0),
            Step::Attribute { path, value, .. } => match value {
                Value::Strings { items, .. } => (path.split('/').count(), items.len()),
                _ => (path.split('/').count(), 0),
            },
        }
    }
}

/// The file h5py would write for `steps` through `driver`.
pub fn lay_out(steps: &[Step], driver: Driver) -> Covered<Layout> {
    // Touches per step: the groups on its path (each parent it makes, with theirs), a dataset, a
    // collection. `Recency` takes 16 bytes a touch: a plan needing more than 128 MiB goes to h5py.
    let touches = (steps.iter())
        .map(|step| match (step, step.reach()) {
            (Step::Group { .. }, (groups, _)) => groups.saturating_mul(groups + 3) / 2 + 2,
            (Step::Dataset { .. }, (groups, _)) => groups.saturating_mul(groups + 3) / 2 + 4,
            (Step::Attribute { .. }, (groups, strings)) => groups.saturating_add(strings) + 2,
        })
        .fold(8usize, usize::saturating_add);
    if touches > MAX_TOUCHES {
        return not_covered("more metadata touches than the replay keeps track of");
    }
    let mut file = File::new(driver, touches)?;
    let mut placed = Vec::new(); // (address, size) of each dataset with bytes
    let mut attributes = HashSet::new(); // (group, name): h5py replaces an existing one otherwise
    for step in steps {
        let (groups, strings) = step.reach();
        let accesses = ACCESSES_PER_STEP
            .saturating_add(groups as u64 * ACCESSES_PER_GROUP)
            .saturating_add(strings as u64 * ACCESSES_PER_STRING);
        file.recency.count(accesses);
        match step {
            Step::Group { path, attribute } => {
                if !path.split('/').all(plain_name) || !plain_attribute(attribute.as_ref()) {
                    return not_covered(format!("group '{path}': a name or attribute h5py encodes otherwise"));
                }
                if file.group_at.contains_key(path.as_str()) {
                    return not_covered(format!("group '{path}' made twice"));
                }
                file.group(path, attribute.as_ref())?;
                if let Some((name, _)) = attribute {
                    attributes.insert((file.group_at[path.as_str()], name.clone()));
                }
            }
            Step::Dataset {
                group,
                name,
                element,
                shape,
                attribute,
                created,
            } => {
                if !file.group_at.contains_key(group.as_str()) {
                    return not_covered(format!("dataset '{name}' in a group not made before"));
                }
                // h5py's `create_dataset("a/b")` is `require_group("a")` then `create_dataset("b")`
                let (group, name) = match name.rsplit_once('/') {
                    Some((above, leaf)) if *created => {
                        let path = if group.is_empty() {
                            above.to_owned()
                        } else {
                            format!("{group}/{above}")
                        };
                        if !path.split('/').all(plain_name) {
                            return not_covered(format!("dataset '{name}': a name h5py encodes otherwise"));
                        }
                        if !file.group_at.contains_key(path.as_str()) {
                            file.group(&path, None)?;
                        }
                        (path, leaf)
                    }
                    _ => (group.clone(), name.as_str()),
                };
                let g = file.group_at[group.as_str()];
                if !plain_name(name) || !plain_attribute(attribute.as_ref()) || shape.len() > MAX_RANK {
                    return not_covered(format!("dataset '{name}': its name, attribute or rank"));
                }
                let elements = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
                let nbytes = elements.and_then(|n| n.checked_mul(element.size()));
                let Some(nbytes) = nbytes.filter(|&n| n < 1 << 62) else {
                    return not_covered(format!("dataset '{name}': a shape too large"));
                };
                if let Some(address) = file.dataset(g, name, *element, shape, attribute.as_ref(), *created)? {
                    placed.push((address, nbytes));
                }
            }
            Step::Attribute { path, name, value } => {
                let Some(&g) = file.group_at.get(path.as_str()) else {
                    return not_covered(format!("attribute '{name}' of a group not made before"));
                };
                if !plain_name(name) || !plain_value(value) || !attributes.insert((g, name.clone())) {
                    return not_covered(format!("attribute '{name}': a name or value h5py encodes otherwise"));
                }
                file.groups[g].attributes += 1;
                if file.groups[g].attributes > MAX_ATTRIBUTES {
                    return not_covered(format!("attribute '{name}': more attributes on a group than replayed"));
                }
                file.group_attribute(g, name, value)?;
                file.touch_path(g)?;
            }
        }
    }
    if !file.groups.iter().all(|g| g.heap.evictions_leave_no_trace()) {
        return not_covered("a name's padding may keep what the metadata cache wrote early");
    }
    file.space.close();
    let size = file.space.end;
    let between = between_tensors(&placed, size, file.pieces())?;
    Ok(Layout {
        size,
        tensor_offsets: placed.iter().map(|p| p.0).collect(),
        between,
    })
}

/// The bytes of each stretch of a `size`-byte file no tensor covers: (start, bytes) with the
/// `pieces` written in order (each inside one stretch: the allocator keeps them apart).
fn between_tensors(tensors: &[(u64, u64)], size: u64, pieces: Vec<(u64, Vec<u8>)>) -> Covered<Vec<(u64, Vec<u8>)>> {
    let mut extents: Vec<(u64, u64)> = tensors.iter().map(|&(o, n)| (o, o + n)).collect();
    extents.sort_unstable();
    let mut gaps = Vec::new();
    let mut cursor = 0;
    for (start, end) in extents {
        if start > cursor {
            gaps.push((cursor, vec![0u8; (start - cursor) as usize]));
        }
        cursor = cursor.max(end);
    }
    if size > cursor {
        gaps.push((cursor, vec![0u8; (size - cursor) as usize]));
    }
    for (offset, data) in pieces {
        let i = gaps.partition_point(|g| g.0 <= offset).saturating_sub(1);
        let at = gaps
            .get(i)
            .and_then(|(start, _)| offset.checked_sub(*start))
            .map(|at| at as usize);
        match (at, gaps.get_mut(i)) {
            (Some(at), Some((_, gap))) if at + data.len() <= gap.len() => {
                gap[at..at + data.len()].copy_from_slice(&data)
            }
            _ => return not_covered(format!("metadata at {offset} overlaps a tensor")), // a replay defect
        }
    }
    Ok(gaps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recency_counts_each_object_once_at_its_latest_touch() {
        // Brute force: the sizes of the objects whose latest touch is after a time.
        let (mut recency, mut stamps) = (Recency::new(64), [(0usize, 0u64); 5]);
        let mut touched: Vec<(usize, u64)> = Vec::new(); // (object, size) per touch
        for (i, (object, size)) in [(0, 10), (1, 20), (0, 30), (2, 5), (3, 7), (1, 1), (4, 100), (0, 2)]
            .into_iter()
            .enumerate()
        {
            recency.touch(&mut stamps[object], size).unwrap();
            touched.push((object, size));
            for time in 0..=i + 1 {
                let latest =
                    (0..5).filter_map(|o| touched.iter().rposition(|t| t.0 == o).map(|at| (at + 1, touched[at].1)));
                let expected: u64 = latest.filter(|&(at, _)| at > time).map(|(_, size)| size).sum();
                assert_eq!(recency.since(time), expected, "after touch {i}, since {time}");
            }
        }
    }

    #[test]
    fn recency_counts_accesses_since_each_touch_however_few_bytes() {
        let (mut recency, mut a, mut b) = (Recency::new(8), (0, 0), (0, 0));
        recency.count(ACCESSES_PER_STEP);
        recency.touch(&mut a, 16).unwrap();
        recency.count(MAYBE_AGED_OUT - 1);
        recency.touch(&mut b, 16).unwrap();
        assert!(
            !recency.maybe_evicted(a.0, a.1),
            "one access short of the age-out bound"
        );
        recency.count(1);
        assert!(recency.maybe_evicted(a.0, a.1) && !recency.maybe_evicted(b.0, b.1));
        assert!(recency.maybe_evicted(0, 0), "never touched: every access counts");
    }

    #[test]
    fn a_later_evictions_headers_do_not_hide_an_earlier_ones() {
        // A 128 KiB free block: its size's third byte is 2. Evicted, a 7-letter name takes the
        // block's first 8 bytes; evicted again, the next block's header zeroes byte 10; a 1-letter
        // name's padding keeps byte 10, which an eviction at the first point alone leaves at 2.
        let size = 1u64 << 17;
        let mut space = Space::default();
        let mut heap = LocalHeap::new(&mut space, 0);
        heap.data = vec![0; size as usize];
        heap.free = vec![(0, size)];
        heap.maybe_evicted();
        heap.insert(&mut space, b"abcdefg", 1).unwrap();
        heap.maybe_evicted();
        heap.insert(&mut space, b"a", 2).unwrap();
        assert!(!heap.evictions_leave_no_trace());
        let mut untouched = LocalHeap::new(&mut space, 0);
        untouched.data = vec![0; size as usize];
        untouched.free = vec![(0, size)];
        untouched.maybe_evicted();
        untouched.insert(&mut space, b"abcdefghijklmno", 1).unwrap(); // no padding
        assert!(untouched.evictions_leave_no_trace());
    }

    fn dataset(group: &str, name: &str, shape: &[u64]) -> Step {
        Step::Dataset {
            group: group.into(),
            name: name.into(),
            element: Element::Float(4),
            shape: shape.to_vec(),
            attribute: None,
            created: false,
        }
    }

    #[test]
    fn an_array_of_strings_goes_to_the_heap_in_libhdf5s_conversion_order() {
        // stock's `layer_names` of five layers: elements 3 and 4, then 2, 1, 0
        assert_eq!(conversion_order(5), [3, 4, 2, 1, 0]);
        assert_eq!(conversion_order(1), [0]);
        let mut order = conversion_order(1000);
        order.sort_unstable();
        assert_eq!(order, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn an_empty_plan_is_a_superblock_root_group_btree_and_heap() {
        let layout = lay_out(&[], Driver::FileObject).unwrap();
        // superblock 96 + group header 40 + B-tree 544 + heap 120: libhdf5's 800-byte empty file.
        assert_eq!(layout.size, 800);
        assert_eq!(layout.between.len(), 1);
        assert_eq!(&layout.between[0].1[..8], b"\x89HDF\r\n\x1a\n");
    }

    #[test]
    fn tensors_are_left_out_and_every_piece_lands_between_them() {
        let mut steps = vec![Step::Group {
            path: "vars".into(),
            attribute: Some(("name".into(), "dense".into())),
        }];
        steps.extend((0..40).map(|i| dataset("vars", &i.to_string(), &[3, 2])));
        let layout = lay_out(&steps, Driver::FileObject).unwrap();
        assert_eq!(layout.tensor_offsets.len(), 40);
        let covered: u64 = layout.between.iter().map(|g| g.1.len() as u64).sum();
        assert_eq!(covered + 40 * 24, layout.size);
    }

    #[test]
    fn posix_small_data_comes_from_a_block_that_moves_behind_large_tensors() {
        // h5py's own `.weights.h5` of this plan: metadata in 2 KiB blocks up to 8192, then the
        // small-data block, which a 12,000-byte tensor pushes back; its rest given back at close.
        let steps = [
            Step::Group {
                path: "vars".into(),
                attribute: Some(("name".into(), "dense".into())),
            },
            dataset("vars", "0", &[4, 3]),
            dataset("vars", "1", &[3000]),
            dataset("vars", "2", &[3]),
        ];
        let layout = lay_out(&steps, Driver::Posix).unwrap();
        assert_eq!(layout.tensor_offsets, [8192, 8240, 20240]);
        assert_eq!(layout.size, 20252);
    }

    #[test]
    fn what_h5py_lays_out_otherwise_is_not_covered() {
        let twice = [dataset("", "a", &[1]), dataset("", "a", &[1])];
        assert!(lay_out(&twice, Driver::FileObject).is_err());
        let missing = [dataset("nowhere", "a", &[1])];
        assert!(lay_out(&missing, Driver::FileObject).is_err());
        let unicode = [Step::Group {
            path: "caf\u{e9}".into(),
            attribute: None,
        }];
        assert!(lay_out(&unicode, Driver::FileObject).is_err());
        let huge = [dataset("", "a", &[u64::MAX, 2])];
        assert!(lay_out(&huge, Driver::FileObject).is_err());
    }

    fn any_step() -> impl proptest::strategy::Strategy<Value = (bool, usize, String, u8, Vec<u64>, bool)> {
        use proptest::prelude::*;
        // Mostly names h5py takes, some twice in a group, now and then one the replay refuses.
        let name = prop_oneof![
            300 => "[a-z0-9_]{1,30}",
            5 => proptest::sample::select(vec!["a", "b", "0"]).prop_map(String::from),
            1 => proptest::sample::select(vec![".", "", "x/y", "n\0", "caf\u{e9}"]).prop_map(String::from),
        ];
        (
            any::<bool>(),
            0usize..64,
            name,
            0u8..6,
            proptest::collection::vec(0u64..5, 0..7),
            proptest::bool::weighted(0.2),
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Any plan, however odd its names, ranks and repeats: laid out or refused, never a panic;
        /// laid out, its tensors and the stretches between them tile the file exactly once.
        #[test]
        fn any_plan_is_laid_out_whole_or_refused(
            picks in proptest::collection::vec(any_step(), 0..120),
            posix in proptest::prelude::any::<bool>(),
        ) {
            let mut groups = vec![String::new()];
            let mut steps = Vec::new();
            for (is_group, parent, name, kind, shape, attribute) in picks {
                let parent = groups[parent % groups.len()].clone();
                if is_group {
                    let attribute = attribute.then(|| ("name".to_string(), name.clone()));
                    let path = if parent.is_empty() { name.clone() } else { format!("{parent}/{name}") };
                    groups.push(path.clone());
                    steps.push(Step::Group { path: path.clone(), attribute });
                    // now and then attributes of each kind, enough to grow the header in every way
                    let items: Vec<Vec<u8>> = shape.iter().map(|&n| name.repeat(n as usize * 40).into_bytes()).collect();
                    let value = match kind {
                        0 => Value::Strings { utf8: true, scalar: true, items: vec![name.clone().into_bytes()] },
                        1 => Value::Strings { utf8: false, scalar: false, items },
                        2 => Value::Fixed { width: items.iter().map(|i| i.len() as u64).max().unwrap_or(1), items },
                        3 => Value::Empty,
                        _ => continue,
                    };
                    for n in 0..shape.len() {
                        steps.push(Step::Attribute { path: path.clone(), name: format!("{name}{n}"), value: value.clone() });
                    }
                } else {
                    let element = [Element::Float(4), Element::Float(2), Element::Signed(8),
                        Element::Unsigned(1), Element::Opaque(2), Element::Float(8)][kind as usize];
                    // Keras marks bfloat16 (opaque words) with a `dtype` attribute
                    let attribute = (element == Element::Opaque(2)).then(|| ("dtype".into(), "bfloat16".into()));
                    steps.push(Step::Dataset { group: parent, name, element, shape, attribute, created: false });
                }
            }
            let driver = if posix { Driver::Posix } else { Driver::FileObject };
            let Ok(layout) = lay_out(&steps, driver) else { return Ok(()) };
            let mut extents: Vec<(u64, u64)> = layout.between.iter().map(|(s, d)| (*s, d.len() as u64)).collect();
            let sizes = steps.iter().filter_map(|s| match s {
                Step::Dataset { element, shape, .. } => Some(shape.iter().product::<u64>() * element.size()),
                Step::Group { .. } | Step::Attribute { .. } => None,
            });
            let tensors: Vec<u64> = sizes.filter(|&n| n > 0).collect();
            proptest::prop_assert_eq!(tensors.len(), layout.tensor_offsets.len());
            extents.extend(layout.tensor_offsets.iter().copied().zip(tensors));
            extents.sort_unstable();
            let mut cursor = 0;
            for (start, len) in extents {
                proptest::prop_assert_eq!(start, cursor);
                cursor += len;
            }
            proptest::prop_assert_eq!(cursor, layout.size);
        }
    }
}
