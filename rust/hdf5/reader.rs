//! Lists the datasets of an HDF5 file whose bytes can be read by offset: contiguous, unfiltered,
//! allocated, of a plain little-endian number type (or Keras' bfloat16, or untagged opaque bytes), stored exactly as large
//! as their shape says. Everything else is left to the caller's slower path (h5py and stock's
//! checks), so this listing never has to agree with HDF5 on anything but the simple case.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
#[cfg(not(fuzzing))]
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Mutex};

use hdf5_reader::btree_v1;
use hdf5_reader::btree_v2::{self, BTreeV2Header, BTreeV2Record};
use hdf5_reader::fractal_heap::FractalHeap;
use hdf5_reader::group::Group;
use hdf5_reader::io::Cursor;
use hdf5_reader::local_heap::LocalHeap;
use hdf5_reader::messages::datatype::VarLenKind;
use hdf5_reader::messages::layout::DataLayout;
use hdf5_reader::messages::link::{self, LinkTarget};
use hdf5_reader::messages::HdfMessage;
use hdf5_reader::symbol_table::SymbolTableNode;
use hdf5_reader::{Datatype, Hdf5File, OpenOptions, Storage, StorageBuffer};

use super::filters::{self, Pipeline};
use crate::error::{Error, Result};

/// Where the HDF5 file's bytes are: a stretch of an open file (a whole `.h5`, a STORED zip
/// member), or memory (an inflated member).
pub enum Source {
    File { file: Arc<File>, start: u64, len: u64 },
    Bytes(Arc<[u8]>),
}

/// A dataset readable by offset: `path` as h5py names it ("/layers/dense/vars/0"), its bytes at
/// `offset` of the HDF5 file, `dtype` as numpy spells it ("<f4", "|u1", "|V2", or "bfloat16").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDataset {
    pub path: String,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub dtype: &'static str,
    /// Bytes of its elements: the shape's elements times the type's size.
    pub nbytes: u64,
    /// For a chunked dataset, where its chunks are (`offset` is then 0); None when contiguous.
    pub chunked: Option<Chunked>,
}

/// A chunked dataset whose filters `filters::Pipeline` undoes, every chunk present exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunked {
    pub chunk_shape: Vec<u64>,
    /// Filter ids in pipeline order.
    pub filters: Vec<u16>,
    pub chunks: Vec<Chunk>,
}

/// One stored chunk: `size` bytes at `offset` of the HDF5 file, holding the elements from `coords`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub size: u64,
    /// Bit i set: filter i was not applied to this chunk.
    pub skipped: u32,
    pub coords: Vec<u64>,
}

/// A stored chunk larger than this for its raw size is damage, not compression.
pub fn max_stored_chunk(raw: u64) -> u64 {
    raw.saturating_mul(2).saturating_add(4096)
}

/// Whether chunks of `chunk_bytes` are in proportion to a dataset of `nbytes`: each chunk read
/// in parallel allocates its raw size, so a tiny hostile dataset declaring 4 GiB chunks would take
/// gigabytes per core. Larger ones (only an extendible dataset can have them) are left to h5py.
pub fn chunks_in_proportion(chunk_bytes: u64, nbytes: u64) -> bool {
    chunk_bytes <= nbytes.max(4 << 20)
}

/// What the listing found: the datasets, or why the file could not be walked here (a layout the
/// crate does not read, or damage it cannot make sense of; h5py may still read it).
#[derive(Debug)]
pub enum Listing {
    /// `left_to_libhdf5`: what only libhdf5 can judge: the datasets the walk reached but does not
    /// list (other layouts, types or filters; names not decoded exactly), listed ones carrying a
    /// `dtype` attribute (but Keras' bfloat16), objects reached twice, holding a message the crate
    /// does not know, or nested too deep to walk, an end-of-file address other than the file's
    /// length. Empty when the listing accounts for every object as h5py would see it.
    Listed {
        datasets: Vec<StoredDataset>,
        left_to_libhdf5: Vec<String>,
    },
    Unreadable(String),
}

/// Why a walk stopped: the crate could not go on, or the file is definitely corrupted in a way
/// that makes libhdf5 misbehave (a global heap whose objects do not tile it loops forever in
/// libhdf5's loader; stock Keras hangs on such a file), so no one should read it further.
#[derive(Debug)]
enum Failure {
    Unreadable(String),
    Corrupt(String),
}

impl From<String> for Failure {
    fn from(msg: String) -> Self {
        Failure::Unreadable(msg)
    }
}

/// Groups nested deeper than this are not listed (stock Keras nests a handful of levels).
const MAX_DEPTH: usize = 64;

/// The HDF5 file as a stretch of an open file, read in page-sized blocks kept in memory: the
/// metadata is many small reads clustered between the tensors, which this turns into fewer reads
/// without reading much of the tensors the load reads anyway (each byte of a `.keras` read once).
struct FileRange {
    file: Arc<File>,
    start: u64,
    len: u64,
    blocks: Mutex<HashMap<u64, Arc<[u8]>>>,
}

/// Size of the blocks the walk reads: the page size of `files.FileRegion`, which serves h5py, so
/// the pages of one can seed the other.
pub const BLOCK: u64 = 4 << 10;

/// Blocks of the file as the walk read them: (index of the BLOCK-sized page from the HDF5 file's
/// start, its bytes; the file's last page may be shorter).
pub type Pages = Vec<(u64, Arc<[u8]>)>;
/// Blocks kept at most (16 MiB); past that the cache starts over.
const MAX_BLOCKS: usize = 4096;

impl FileRange {
    /// The blocks read and still kept, by index from the HDF5 file's start.
    fn take_blocks(&self) -> Pages {
        let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        let mut pages: Pages = blocks.drain().collect();
        pages.sort_unstable_by_key(|&(index, _)| index);
        pages
    }

    fn block(&self, index: u64) -> std::io::Result<Arc<[u8]>> {
        let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(block) = blocks.get(&index) {
            return Ok(Arc::clone(block));
        }
        let offset = index * BLOCK;
        let mut buffer = vec![0u8; BLOCK.min(self.len - offset) as usize];
        self.file.read_exact_at(&mut buffer, self.start + offset)?;
        if blocks.len() >= MAX_BLOCKS {
            blocks.clear();
        }
        let block: Arc<[u8]> = buffer.into();
        blocks.insert(index, Arc::clone(&block));
        Ok(block)
    }
}

impl Storage for FileRange {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_range(&self, offset: u64, len: usize) -> hdf5_reader::error::Result<StorageBuffer> {
        let end = offset.checked_add(len as u64).filter(|&end| end <= self.len);
        let Some(end) = end else {
            return Err(hdf5_reader::error::Error::UnexpectedEof {
                offset,
                needed: len as u64,
                available: self.len.saturating_sub(offset),
            });
        };
        let mut buffer = vec![0u8; len];
        if len as u64 > 4 * BLOCK {
            self.file.read_exact_at(&mut buffer, self.start + offset)?;
            return Ok(StorageBuffer::from_vec(buffer));
        }
        let mut at = offset;
        while at < end {
            let block = self.block(at / BLOCK)?;
            let within = (at % BLOCK) as usize;
            let n = (block.len() - within).min((end - at) as usize);
            buffer[(at - offset) as usize..][..n].copy_from_slice(&block[within..within + n]);
            at += n as u64;
        }
        Ok(StorageBuffer::from_vec(buffer))
    }
}

/// Reads no more metadata than a Keras file can need: a hostile file cannot make a read, a header
/// or a chunk allocate more.
fn bounded_options() -> OpenOptions {
    OpenOptions::default()
        .with_max_read_bytes(64 << 20)
        .with_max_chunk_bytes(16 << 20)
        .with_max_object_header_bytes(1 << 20)
        .with_chunk_cache_bytes(0)
}

/// Every dataset of the file readable by offset, each object once (through hard links only), or
/// `Unreadable` when the walk cannot be done here. `path` names the file in errors: an error is a
/// file found corrupted (see `Failure`). Never panics: a panic inside the parser is `Unreadable`.
pub fn list_stored_datasets(source: Source, path: &Path) -> Result<Listing> {
    list_keeping_pages(source, path).map(|(listing, _)| listing)
}

/// `list_stored_datasets`, also returning the blocks of a `Source::File` the walk read (up to
/// 16 MiB of them), so the caller's other reader of the metadata need not read them again.
pub fn list_keeping_pages(source: Source, path: &Path) -> Result<(Listing, Pages)> {
    let mut pages = Pages::new();
    // Fuzzing (fuzz/) wants the parser's panics to surface, not to be turned into `Unreadable`.
    #[cfg(fuzzing)]
    let walked: std::thread::Result<_> = Ok(walk_source(source, &mut pages));
    #[cfg(not(fuzzing))]
    let walked = catch_unwind(AssertUnwindSafe(|| walk_source(source, &mut pages)));
    let listing = match walked {
        Ok(Ok(walk)) => Listing::Listed {
            datasets: walk.found,
            left_to_libhdf5: walk.left_to_libhdf5,
        },
        Ok(Err(Failure::Unreadable(msg))) => Listing::Unreadable(msg),
        Ok(Err(Failure::Corrupt(msg))) => return Err(Error::format(path, format!("corrupted HDF5 file: {msg}"))),
        Err(_) => Listing::Unreadable("the HDF5 parser failed".to_string()),
    };
    Ok((listing, pages))
}

fn walk_source(source: Source, pages: &mut Pages) -> std::result::Result<Walked, Failure> {
    let (opened, range) = match source {
        Source::File { file, start, len } => {
            let blocks = Mutex::new(HashMap::new());
            let range = Arc::new(FileRange {
                file,
                start,
                len,
                blocks,
            });
            let opened = Hdf5File::from_storage_with_options(range.clone(), bounded_options());
            (opened, Some(range))
        }
        Source::Bytes(bytes) => (Hdf5File::from_shared_bytes_with_options(bytes, bounded_options()), None),
    };
    let walked = opened
        .map_err(|e| Failure::from(e.to_string()))
        .and_then(|file| walk_file(&file));
    if let Some(range) = range {
        *pages = range.take_blocks();
    }
    walked
}

/// What a walk found: the datasets it lists, and what it reached but does not (see `Listing`).
struct Walked {
    found: Vec<StoredDataset>,
    left_to_libhdf5: Vec<String>,
}

fn walk_file(file: &Hdf5File) -> std::result::Result<Walked, Failure> {
    // Addresses count from the superblock: with a user block before it (never in Keras files) they
    // are not file offsets, and which base libhdf5 takes is its own business.
    let signature = file.storage().read_range(0, 8).map_err(|e| e.to_string())?;
    if signature.as_ref() != b"\x89HDF\r\n\x1a\n" || file.superblock().base_address != 0 {
        return Err(Failure::Unreadable(
            "the superblock is not at the start of the file".into(),
        ));
    }
    let mut walk = Walk {
        file,
        visited: HashSet::new(),
        heaps: HashSet::new(),
        found: Vec::new(),
        left_to_libhdf5: Vec::new(),
        metadata: vec![(0, superblock_len(file))],
    };
    let root = file.root_group().map_err(|e| e.to_string())?;
    walk.group(&root, "", 0)?;
    let mut heaps: Vec<u64> = walk.heaps.into_iter().collect();
    heaps.sort_unstable();
    for address in heaps {
        let size = check_global_heap(file, address)?;
        walk.metadata.push((address, size));
    }
    check_disjoint(&walk.found, walk.metadata)?;
    // libhdf5 refuses a file shorter than this address, and anything lying past it; h5py
    // writes it as the file's length.
    let (eof, len) = (file.superblock().eof_address, file.storage().len());
    if eof != len {
        let what = format!("the file ends at byte {len}, its superblock says {eof} (truncated?)");
        walk.left_to_libhdf5.push(what);
    }
    Ok(Walked {
        found: walk.found,
        left_to_libhdf5: walk.left_to_libhdf5,
    })
}

/// Refuses a file whose tensors overlap each other or metadata the walk read: libhdf5 never lays
/// them out so, and a damaged data address that lands there would load other bytes silently.
fn check_disjoint(found: &[StoredDataset], metadata: Vec<(u64, u64)>) -> std::result::Result<(), Failure> {
    let mut extents: Vec<(u64, u64, Option<&str>)> = found
        .iter()
        .flat_map(|d| {
            let name = Some(d.path.as_str());
            match &d.chunked {
                None => vec![(d.offset, d.offset + d.nbytes, name)],
                Some(c) => c.chunks.iter().map(|k| (k.offset, k.offset + k.size, name)).collect(),
            }
        })
        .chain(metadata.into_iter().map(|(at, len)| (at, at.saturating_add(len), None)))
        .filter(|&(start, end, _)| end > start)
        .collect();
    extents.sort_unstable();
    // Metadata may share bytes with metadata (a heap inside a header block): only overlaps that
    // involve a tensor count, so each extent is compared with the furthest-reaching one before it.
    let mut reach: Option<(u64, Option<&str>)> = None;
    for (start, end, tensor) in extents {
        if let Some((before_end, before)) = reach.filter(|&(e, _)| e > start) {
            if let Some(name) = tensor.or(before) {
                return Err(Failure::Corrupt(match (tensor, before) {
                    (Some(t), Some(b)) if t == b => {
                        format!("two chunks of dataset '{name}' overlap (a damaged chunk index?)")
                    }
                    (Some(_), Some(b)) => {
                        format!("the bytes of dataset '{name}' overlap dataset '{b}' (a damaged data address?)")
                    }
                    _ => format!("the bytes of dataset '{name}' overlap the file's metadata (a damaged data address?)"),
                }));
            }
            if end <= before_end {
                continue;
            }
        }
        reach = Some((end, tensor));
    }
    Ok(())
}

/// Bytes of the superblock (versions 0-1 end with the root group's symbol table entry).
fn superblock_len(file: &Hdf5File) -> u64 {
    let superblock = file.superblock();
    let os = u64::from(superblock.offset_size);
    match superblock.version {
        0 => 24 + 4 * os + (2 * os + 24),
        1 => 28 + 4 * os + (2 * os + 24),
        _ => 12 + 4 * os + 4,
    }
}

/// The first chunk of the object header at `address` (continuation chunks are not located).
fn header_extent(storage: &dyn Storage, address: u64) -> std::result::Result<(u64, u64), String> {
    let prefix = storage.read_range(address, 16).map_err(|e| e.to_string())?;
    let le = |b: &[u8]| b.iter().rev().fold(0u64, |n, &x| (n << 8) | u64::from(x));
    if prefix.get(0..4) != Some(b"OHDR".as_slice()) {
        // version 1: a 16-byte prefix (12 and padding), then the messages' bytes
        return Ok((address, 16 + le(&prefix[8..12])));
    }
    let flags = prefix[5];
    let mut at = 6 + if flags & 0x20 != 0 { 16 } else { 0 } + if flags & 0x10 != 0 { 4 } else { 0 };
    let width = 1usize << (flags & 3);
    let size = storage
        .read_range(address + at as u64, width)
        .map_err(|e| e.to_string())?;
    at += width;
    Ok((address, at as u64 + le(&size) + 4)) // and the checksum
}

struct Walk<'a> {
    file: &'a Hdf5File,
    visited: HashSet<u64>,
    /// Global heap collections holding the variable-length values of the attributes seen.
    heaps: HashSet<u64>,
    found: Vec<StoredDataset>,
    left_to_libhdf5: Vec<String>,
    /// (address, length) of the metadata read: headers, heaps, symbol table nodes.
    metadata: Vec<(u64, u64)>,
}

impl Walk<'_> {
    fn group(&mut self, group: &Group, path: &str, depth: usize) -> std::result::Result<(), Failure> {
        if depth > MAX_DEPTH {
            // Nesting no Keras file has: nothing more is listed from here.
            self.left_to_libhdf5.push(path.to_string());
            return Ok(());
        }
        if !self.visited.insert(group.address()) {
            // Walked already, through another hard link (or a cycle): h5py names an object reached
            // twice by the first of its names in its own order, which need not be the walk's.
            self.left_to_libhdf5.push(path.to_string());
            return Ok(());
        }
        self.note_header(group.address(), path)?;
        let hard = hard_link_names(self.file, group.address(), &mut self.metadata)?;
        let (groups, datasets) = group.members().map_err(|e| e.to_string())?;
        for dataset in datasets {
            let name = format!("{path}/{}", dataset.name());
            // Names decoded lossily could stand for another object's: only exact ones are listed.
            if dataset.name().contains('\u{fffd}') {
                self.left_to_libhdf5.push(name);
                continue;
            }
            if !hard.contains(dataset.name()) {
                continue; // a soft or external link: no object of this file
            }
            if !self.visited.insert(dataset.address()) {
                self.left_to_libhdf5.push(name); // reached twice (see above)
                continue;
            }
            let tagged = self.note_header(dataset.address(), &name)?;
            match stored_dataset(self.file, &dataset, name.clone())? {
                Some(stored) => {
                    // A `dtype` attribute on anything but Keras' bfloat16 may say what h5py's
                    // readers take the type to be: theirs to judge (Keras writes none).
                    if tagged && stored.dtype != "bfloat16" {
                        self.left_to_libhdf5.push(name);
                    }
                    self.found.push(stored)
                }
                None => self.left_to_libhdf5.push(name),
            }
        }
        for child in groups {
            let name = format!("{path}/{}", child.name());
            if child.name().contains('\u{fffd}') {
                self.left_to_libhdf5.push(name);
            } else if hard.contains(child.name()) {
                self.group(&child, &name, depth + 1)?;
            }
        }
        Ok(())
    }

    /// Notes the object header at `address` (object `path`): its extent; the global heap
    /// collections that its variable-length attributes point into (h5py writes `str` attributes
    /// so: `model_config`, `keras_version`, Keras 3's `dtype`); a message the crate does not know
    /// (libhdf5 may refuse the object: a message can say "fail if unknown") leaves the object to
    /// libhdf5. Returns whether it has an attribute named `dtype`.
    fn note_header(&mut self, address: u64, path: &str) -> std::result::Result<bool, Failure> {
        let header = self.file.get_or_parse_header(address).map_err(|e| e.to_string())?;
        self.metadata.push(header_extent(self.file.storage(), address)?);
        let os = usize::from(self.file.superblock().offset_size);
        if header.messages.iter().any(|m| matches!(m, HdfMessage::Unknown { .. })) {
            self.left_to_libhdf5.push(path.to_string());
        }
        let offset_size = self.file.superblock().offset_size;
        let mut tagged = false;
        for message in &header.messages {
            let attribute = match message {
                HdfMessage::Attribute(attribute) => attribute,
                // Attributes stored densely (a fractal heap) are not read here: any may be `dtype`.
                HdfMessage::AttributeInfo(info) => {
                    tagged |= !Cursor::is_undefined_offset(info.fractal_heap_address, offset_size);
                    continue;
                }
                _ => continue,
            };
            tagged |= attribute.name == "dtype";
            let Datatype::VarLen { kind, base, .. } = &attribute.datatype else {
                continue;
            };
            // libhdf5 reads a variable-length type of no known kind, or a string of wider than
            // byte characters, as a sequence of something: h5py crashes converting it.
            let byte_string = matches!(base.as_ref(), Datatype::FixedPoint { size: 1, .. });
            if matches!(kind, VarLenKind::Unknown(_)) || (*kind == VarLenKind::String && !byte_string) {
                return Err(Failure::Corrupt(format!(
                    "attribute '{}' at {address} has a damaged variable-length type",
                    attribute.name
                )));
            }
            // Each element: its length (4 bytes), the collection's address, the object's index (4 bytes).
            for element in attribute.raw_data.chunks_exact(8 + os) {
                let mut address = [0u8; 8];
                address[..os.min(8)].copy_from_slice(&element[4..4 + os.min(8)]);
                let address = u64::from_le_bytes(address);
                let length = u32::from_le_bytes([element[0], element[1], element[2], element[3]]);
                if length > 0 && !Cursor::is_undefined_offset(address, offset_size) {
                    self.heaps.insert(address);
                }
            }
        }
        Ok(tagged)
    }
}

/// Largest global heap collection read (libhdf5 makes them 4 KiB, or one object's size).
const MAX_HEAP_COLLECTION: u64 = 256 << 20;

/// Checks that a global heap collection's objects tile it exactly, as libhdf5's loader walks them:
/// an object that claims no room, or more than is left, is corruption that makes libhdf5 loop
/// forever or read past the collection. Returns the collection's size.
fn check_global_heap(file: &Hdf5File, address: u64) -> std::result::Result<u64, Failure> {
    let storage = file.storage();
    let ls = usize::from(file.superblock().length_size);
    let corrupt = |what: String| Failure::Corrupt(format!("global heap collection at {address}: {what}"));
    let header = storage
        .read_range(address, 8 + ls)
        .map_err(|e| corrupt(e.to_string()))?;
    if header.get(0..4) != Some(b"GCOL".as_slice()) {
        return Err(corrupt("no GCOL signature".into()));
    }
    let size = header[8..8 + ls]
        .iter()
        .rev()
        .fold(0u64, |n, &b| (n << 8) | u64::from(b));
    if size < (8 + ls) as u64 || size > MAX_HEAP_COLLECTION {
        return Err(corrupt(format!("size {size}")));
    }
    let size = size as usize;
    let bytes = storage.read_range(address, size).map_err(|e| corrupt(e.to_string()))?;
    let object_header = 8 + ls;
    let mut at = object_header;
    while at < size {
        if at + object_header > size {
            break; // too small for an object: free space, as libhdf5 takes it
        }
        let index = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let length = bytes[at + 8..at + 8 + ls]
            .iter()
            .rev()
            .fold(0u64, |n, &b| (n << 8) | u64::from(b));
        let need = if index > 0 {
            length
                .checked_add(7)
                .map(|n| n / 8 * 8)
                .and_then(|n| n.checked_add(object_header as u64))
        } else {
            Some(length) // the free space, its header included
        };
        match need {
            Some(need) if need > 0 && need <= (size - at) as u64 => at += need as usize,
            _ => {
                return Err(corrupt(format!(
                    "object {index} at {at} claims {length} bytes of the {} left",
                    size - at
                )))
            }
        }
    }
    Ok(size as u64)
}

/// The dataset's place in the file, when its bytes are its elements verbatim.
fn stored_dataset(
    file: &Hdf5File,
    dataset: &hdf5_reader::Dataset,
    path: String,
) -> std::result::Result<Option<StoredDataset>, Failure> {
    let header = file.get_or_parse_header(dataset.address()).map_err(|e| e.to_string())?;
    let mut layout = None;
    let mut filters: Vec<(u16, &[u32])> = Vec::new();
    for message in &header.messages {
        match message {
            HdfMessage::DataLayout(l) => layout = Some(&l.layout),
            HdfMessage::FilterPipeline(p) => {
                filters = p.filters.iter().map(|f| (f.id, f.client_data.as_slice())).collect()
            }
            HdfMessage::ExternalFiles(_) => return Ok(None),
            _ => {}
        }
    }
    let superblock = file.superblock();
    let (address, size) = match layout {
        Some(&DataLayout::Contiguous { address, size }) if filters.is_empty() => (address, size),
        Some(DataLayout::Chunked {
            address,
            dims,
            chunk_indexing: None, // a version 1 B-tree, what h5py writes by default
            ..
        }) if Pipeline::supported(&ids(&filters)) && !Cursor::is_undefined_offset(*address, superblock.offset_size) => {
            return chunked_dataset(file, dataset, path, *address, dims, &filters);
        }
        _ => return Ok(None),
    };
    if Cursor::is_undefined_offset(address, superblock.offset_size) {
        return Ok(None); // never written: reading gives fill values
    }
    let Some((dtype, itemsize)) = element_type(dataset, &path)? else {
        return Ok(None);
    };
    let shape = dataset.shape().to_vec();
    let nbytes = shape.iter().try_fold(itemsize, |n, &d| n.checked_mul(d));
    if nbytes != Some(size) || size == 0 {
        return Ok(None);
    }
    let placed = address
        .checked_add(superblock.base_address)
        .and_then(|o| Some((o, o.checked_add(size)?)));
    let Some((offset, _)) = placed.filter(|&(_, end)| end <= file.storage().len()) else {
        let what = format!("dataset '{path}' needs bytes {address}..+{size}, past the end (truncated?)");
        return Err(Failure::Corrupt(what));
    };
    Ok(Some(StoredDataset {
        path,
        offset,
        shape,
        dtype,
        nbytes: size,
        chunked: None,
    }))
}

/// The dataset's element type, refusing the number types libhdf5 would misread.
fn element_type(
    dataset: &hdf5_reader::Dataset,
    path: &str,
) -> std::result::Result<Option<(&'static str, u64)>, Failure> {
    let raw = dataset.raw_datatype().map_err(|e| e.to_string())?;
    if reserved_bits_set(&raw) {
        // libhdf5 ignores these bits: a float whose class bit flipped reads as integers
        let what = format!("dataset '{path}' has a damaged number type (reserved bits set)");
        return Err(Failure::Corrupt(what));
    }
    Ok(numpy_dtype(dataset)?)
}

fn ids(filters: &[(u16, &[u32])]) -> Vec<u16> {
    filters.iter().map(|&(id, _)| id).collect()
}

/// A chunked dataset's chunks from its version 1 B-tree, when every chunk of its shape is there
/// exactly once, inside the file (a partly written dataset reads fill values: h5py does that).
fn chunked_dataset(
    file: &Hdf5File,
    dataset: &hdf5_reader::Dataset,
    path: String,
    btree: u64,
    dims: &[u32],
    pipeline: &[(u16, &[u32])],
) -> std::result::Result<Option<StoredDataset>, Failure> {
    let Some((dtype, itemsize)) = element_type(dataset, &path)? else {
        return Ok(None);
    };
    // Parameters as libhdf5 checks them (a file saying otherwise is read or refused by libhdf5, as
    // stock reads it): it unshuffles by the shuffle filter's own parameter, which h5py sets to the
    // element size, and refuses a deflate level past 9.
    let as_h5py_writes = |&(id, params): &(u16, &[u32])| match id {
        filters::SHUFFLE => params == [itemsize as u32],
        filters::DEFLATE => matches!(params, [level] if *level <= 9),
        _ => true,
    };
    if !pipeline.iter().all(as_h5py_writes) {
        return Ok(None);
    }
    let shape = dataset.shape().to_vec();
    let chunk_shape: Vec<u64> = dims.iter().map(|&d| u64::from(d)).collect();
    if chunk_shape.len() != shape.len() || chunk_shape.contains(&0) || shape.is_empty() {
        return Ok(None);
    }
    let nbytes = shape.iter().try_fold(itemsize, |n, &d| n.checked_mul(d));
    let chunk_bytes = chunk_shape.iter().try_fold(itemsize, |n, &d| n.checked_mul(d));
    let expected = shape
        .iter()
        .zip(&chunk_shape)
        .try_fold(1u64, |n, (&d, &c)| n.checked_mul(d.div_ceil(c)));
    let (Some(nbytes), Some(chunk_bytes), Some(expected)) = (nbytes, chunk_bytes, expected) else {
        return Ok(None);
    };
    if nbytes == 0 || chunk_bytes > 1 << 32 || !chunks_in_proportion(chunk_bytes, nbytes) {
        return Ok(None);
    }
    let superblock = file.superblock();
    let leaves = btree_v1::collect_btree_v1_leaves_storage(
        file.storage(),
        btree,
        superblock.offset_size,
        superblock.length_size,
        Some(shape.len() as u32),
        dims,
        None,
    )
    .map_err(|e| e.to_string())?;
    if leaves.len() as u64 != expected {
        return Ok(None);
    }
    let mut chunks = Vec::with_capacity(leaves.len());
    let mut seen = HashSet::with_capacity(leaves.len());
    for (key, offset) in leaves {
        let btree_v1::BTreeV1Key::RawData {
            chunk_size,
            filter_mask,
            offsets,
        } = key
        else {
            return Err(Failure::Corrupt(format!(
                "dataset '{path}' has a chunk index of the wrong kind"
            )));
        };
        let coords = offsets.get(..shape.len()).unwrap_or_default().to_vec();
        let aligned = coords.len() == shape.len()
            && coords
                .iter()
                .zip(&shape)
                .zip(&chunk_shape)
                .all(|((&o, &d), &c)| o < d && o % c == 0);
        let size = u64::from(chunk_size);
        let inside = offset.checked_add(size).is_some_and(|end| end <= file.storage().len());
        if !aligned || !seen.insert(coords.clone()) || !inside || size > max_stored_chunk(chunk_bytes) {
            let what = format!("dataset '{path}' has a chunk at {coords:?} of {size} bytes at {offset} that does not fit its shape or the file");
            return Err(Failure::Corrupt(what));
        }
        if filter_mask != 0 {
            // A filter libhdf5 skipped for this chunk: nothing checks such a mask, so h5py reads it.
            return Ok(None);
        }
        chunks.push(Chunk {
            offset,
            size,
            skipped: filter_mask,
            coords,
        });
    }
    Ok(Some(StoredDataset {
        path,
        offset: 0,
        shape,
        dtype,
        nbytes,
        chunked: Some(Chunked {
            chunk_shape,
            filters: ids(pipeline),
            chunks,
        }),
    }))
}

/// Whether a fixed-point or floating-point datatype message sets bits its class reserves
/// (HDF5 spec, datatype message: fixed-point bits 4-23, floating-point bits 7 and 16-23).
fn reserved_bits_set(raw: &[u8]) -> bool {
    let (Some(&first), Some(&b1), Some(&b2), Some(&b3)) = (raw.first(), raw.get(1), raw.get(2), raw.get(3)) else {
        return false;
    };
    match first & 0x0f {
        0 => b1 & 0xf0 != 0 || b2 != 0 || b3 != 0,
        1 => b1 & 0x80 != 0 || b3 != 0,
        _ => false,
    }
}

/// numpy's name for the dataset's element type and its size, when its stored bytes are native
/// little-endian numbers; checked on the datatype message as stored (bit offsets, precision,
/// exponent and mantissa layout), since HDF5 converts any other layout on read.
fn numpy_dtype(dataset: &hdf5_reader::Dataset) -> std::result::Result<Option<(&'static str, u64)>, String> {
    let raw = dataset.raw_datatype().map_err(|e| e.to_string())?;
    let dtype = match (dataset.dtype(), standard_number(&raw)) {
        (Datatype::FixedPoint { .. } | Datatype::FloatingPoint { .. }, Some(name)) => Some(name),
        (Datatype::Opaque { size: 2, .. }, _) if is_keras_bfloat16(dataset) => Some(("bfloat16", 2)),
        (Datatype::Opaque { size, tag }, _) if tag.is_empty() => untagged_opaque(*size),
        _ => None,
    };
    Ok(dtype)
}

/// numpy's name for an opaque type with no tag, as h5py reads it ("|V2"): what h5py writes for
/// numpy's void and for ml_dtypes' types, bfloat16 in the legacy `.h5` writers included.
fn untagged_opaque(size: u32) -> Option<(&'static str, u64)> {
    let name = match size {
        1 => "|V1",
        2 => "|V2",
        4 => "|V4",
        8 => "|V8",
        16 => "|V16",
        _ => return None,
    };
    Some((name, u64::from(size)))
}

/// Keras 3 stores a bfloat16 tensor as 2-byte opaque data with a `dtype` attribute saying so.
fn is_keras_bfloat16(dataset: &hdf5_reader::Dataset) -> bool {
    dataset.attributes().iter().any(|a| {
        a.name == "dtype" && a.shape.is_empty() && a.read_strings().is_ok_and(|s| s.len() == 1 && s[0] == "bfloat16")
    })
}

/// The numpy name and size of an HDF5 datatype message that is exactly one of HDF5's standard
/// little-endian integers (`H5T_STD_[IU]{8,16,32,64}LE`) or IEEE floats (`H5T_IEEE_F{16,32,64}LE`)
/// (version-1 object headers pad the message: bytes past its properties are ignored).
fn standard_number(raw: &[u8]) -> Option<(&'static str, u64)> {
    let class = raw.first()? & 0x0f;
    let bits = *raw.get(1)?;
    let (bits2, bits3) = (*raw.get(2)?, *raw.get(3)?);
    let size = u32::from_le_bytes(raw.get(4..8)?.try_into().ok()?);
    let u16_at = |i: usize| raw.get(i..i + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let (offset, precision) = (u16_at(8)?, u16_at(10)?);
    if offset != 0 || u32::from(precision) != size * 8 || bits3 != 0 {
        return None;
    }
    match class {
        0 => {
            // fixed point: little-endian, zero padding; bit 3 says signed
            if bits & !0x08 != 0 || bits2 != 0 {
                return None;
            }
            let signed = bits & 0x08 != 0;
            let name = match (size, signed) {
                (1, true) => "|i1",
                (1, false) => "|u1",
                (2, true) => "<i2",
                (2, false) => "<u2",
                (4, true) => "<i4",
                (4, false) => "<u4",
                (8, true) => "<i8",
                (8, false) => "<u8",
                _ => return None,
            };
            Some((name, u64::from(size)))
        }
        1 => {
            // floating point: little-endian, zero padding, implied mantissa bit, sign in the top bit
            let (epos, esize, mpos, msize) = (*raw.get(12)?, *raw.get(13)?, *raw.get(14)?, *raw.get(15)?);
            let bias = u32::from_le_bytes(raw.get(16..20)?.try_into().ok()?);
            if bits != 0x20 || u32::from(bits2) != size * 8 - 1 || mpos != 0 {
                return None;
            }
            let name = match (size, epos, esize, msize, bias) {
                (2, 10, 5, 10, 15) => "<f2",
                (4, 23, 8, 23, 127) => "<f4",
                (8, 52, 11, 52, 1023) => "<f8",
                _ => return None,
            };
            Some((name, u64::from(size)))
        }
        _ => None,
    }
}

/// Names of the group's hard links. Soft and external links are left out: stock refuses to load
/// through them, and the crate's own walk would follow them.
/// The local heaps, B-tree root nodes and symbol table nodes read are added to `metadata`, with
/// the size libhdf5 allocates them.
fn hard_link_names(
    file: &Hdf5File,
    address: u64,
    metadata: &mut Vec<(u64, u64)>,
) -> std::result::Result<HashSet<String>, String> {
    let error = |e: hdf5_reader::error::Error| e.to_string();
    let storage = file.storage();
    let (os, ls) = (file.superblock().offset_size, file.superblock().length_size);
    let header = file.get_or_parse_header(address).map_err(error)?;
    let mut names = HashSet::new();
    let mut dense = None;
    for message in &header.messages {
        match message {
            HdfMessage::SymbolTable(table) => {
                let heap = LocalHeap::parse_at_storage(storage, table.heap_address, os, ls).map_err(error)?;
                metadata.push((table.heap_address, 8 + 2 * u64::from(ls) + u64::from(os)));
                metadata.push((heap.data_segment_address, heap.data_segment_size));
                // The root node of the group's B-tree, allocated whole: 2K children, 2K+1 keys.
                let k = u64::from(file.superblock().group_internal_node_k);
                let (o, l) = (u64::from(os), u64::from(ls));
                metadata.push((table.btree_address, 8 + 2 * o + 2 * k * o + (2 * k + 1) * l));
                let leaves =
                    btree_v1::collect_btree_v1_leaves_storage(storage, table.btree_address, os, ls, None, &[], None)
                        .map_err(error)?;
                for (_, node_address) in leaves {
                    let leaf_k = file.superblock().group_leaf_node_k;
                    let (node, length) = symbol_table_node(storage, node_address, os, ls, leaf_k)?;
                    metadata.push((node_address, length));
                    for entry in node.entries {
                        if entry.cache_type != 2 {
                            // cache type 2 is a soft link
                            names.insert(
                                heap.get_string_storage(entry.link_name_offset, storage)
                                    .map_err(error)?,
                            );
                        }
                    }
                }
            }
            HdfMessage::Link(l) => {
                if let LinkTarget::Hard { .. } = l.target {
                    names.insert(l.name.clone());
                }
            }
            HdfMessage::LinkInfo(info) => dense = Some(info.clone()),
            _ => {}
        }
    }
    if let Some(info) = dense.filter(|i| !Cursor::is_undefined_offset(i.fractal_heap_address, os)) {
        let heap = FractalHeap::parse_at_storage(storage, info.fractal_heap_address, os, ls).map_err(error)?;
        let tree = BTreeV2Header::parse_at_storage(storage, info.btree_name_index_address, os, ls).map_err(error)?;
        for record in
            btree_v2::collect_btree_v2_records_storage(storage, &tree, os, ls, None, &[], None).map_err(error)?
        {
            let BTreeV2Record::LinkNameHash { heap_id, .. } = record else {
                continue;
            };
            let bytes = heap.get_object_storage(&heap_id, storage, os, ls).map_err(error)?;
            let l = link::parse(&mut Cursor::new(&bytes), os, ls, bytes.len()).map_err(error)?;
            if let LinkTarget::Hard { .. } = l.target {
                names.insert(l.name);
            }
        }
    }
    Ok(names)
}

fn symbol_table_node(
    storage: &dyn Storage,
    address: u64,
    os: u8,
    ls: u8,
    leaf_k: u16,
) -> std::result::Result<(SymbolTableNode, u64), String> {
    let prefix = storage.read_range(address, 8).map_err(|e| e.to_string())?;
    if prefix.get(0..4) != Some(b"SNOD".as_slice()) {
        return Err(format!("no symbol table node at {address}"));
    }
    let entries = usize::from(u16::from_le_bytes([prefix[6], prefix[7]]));
    let length = 8 + entries * (2 * usize::from(os) + 24);
    let bytes = storage.read_range(address, length).map_err(|e| e.to_string())?;
    let node = SymbolTableNode::parse(&mut Cursor::new(bytes.as_ref()), os, ls).map_err(|e| e.to_string())?;
    Ok((node, 8 + 2 * u64::from(leaf_k) * (2 * u64::from(os) + 24))) // allocated for 2K entries
}

#[cfg(test)]
mod tests;
