//! The LevelDB SSTable that holds a tensor bundle's `.index`, written and read exactly as TensorFlow's
//! `tsl/lib/io/table_builder.cc` + `block_builder.cc` + `format.cc` do (LevelDB `doc/table_format.md`).
//!
//! TensorFlow's options (`table_options.h` defaults, `tensor_bundle.cc` `BundleWriter::Finish`):
//! block size 262144, restart interval 16 (1 in the index block), no compression, bytewise key order.
//! TF adds one rule to LevelDB's builder: an entry whose key + value is at least 2 × block size first
//! flushes the pending data block, so it starts a block of its own.
//!
//! The reader never trusts the file: every length, offset, restart point, handle and checksum is checked,
//! blocks must come in file order without overlapping, keys must be strictly increasing, and the keys it
//! materializes from prefix-compressed entries are capped at [`KEY_EXPANSION_LIMIT`] × the file length.

use crate::error::{Error, Result};

/// Approximate uncompressed size of a data block (`table::Options::block_size`).
pub const BLOCK_SIZE: usize = 262_144;
/// Keys between restart points in data blocks (`table::Options::block_restart_interval`).
pub const RESTART_INTERVAL: usize = 16;
/// The index block restarts at every key (`TableBuilder::Rep`).
pub const INDEX_RESTART_INTERVAL: usize = 1;
/// `kTableMagicNumber`, the last 8 bytes of every table (little-endian).
pub const MAGIC: u64 = 0xdb47_7524_8b80_fb57;
/// `Footer::kEncodedLength`: two block handles padded to 40 bytes, then the magic.
pub const FOOTER_LEN: usize = 48;
/// `kBlockTrailerSize`: compression type byte + masked CRC32C of contents and type.
const TRAILER_LEN: usize = 5;
/// `BlockHandle::kMaxEncodedLength`: two varint64s.
const HANDLE_MAX_LEN: usize = 20;
const NO_COMPRESSION: u8 = 0;
const SNAPPY_COMPRESSION: u8 = 1;
/// A table TensorFlow wrote materializes at most ~16 × its size in keys (one full key per restart
/// interval); the reader refuses files whose keys would expand beyond this multiple of the file length.
pub const KEY_EXPANSION_LIMIT: usize = 32;

/// A parse failure without the path; the public functions add it.
pub(super) type Parse<T> = std::result::Result<T, String>;

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(super) fn put_fixed32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A bounds-checked cursor over untrusted bytes.
pub(super) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    pub(super) fn pos(&self) -> usize {
        self.pos
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// A varint of at most 10 bytes whose value fits 64 bits.
    pub(super) fn varint64(&mut self) -> Parse<u64> {
        let mut value = 0u64;
        for i in 0..10 {
            let byte = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            if i == 9 && byte > 1 {
                return Err("varint overflows 64 bits".into());
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    /// A varint of at most 5 bytes whose value fits 32 bits (LevelDB's `GetVarint32`).
    pub(super) fn varint32(&mut self) -> Parse<u32> {
        let mut value = 0u64;
        for i in 0..5 {
            let byte = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                return u32::try_from(value).map_err(|_| "varint overflows 32 bits".into());
            }
        }
        Err("varint32 longer than 5 bytes".into())
    }

    pub(super) fn bytes(&mut self, n: u64) -> Parse<&'a [u8]> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= rest.len())
            .ok_or_else(|| format!("{n} bytes wanted at offset {} where {} remain", self.pos, rest.len()))?;
        self.pos += n;
        Ok(&rest[..n])
    }

    pub(super) fn fixed32(&mut self) -> Parse<u32> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(super) fn fixed64(&mut self) -> Parse<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

/// Where a block sits in the file (`BlockHandle`): offset and size of its contents, trailer excluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHandle {
    pub offset: u64,
    pub size: u64,
}

impl BlockHandle {
    fn encode_to(&self, out: &mut Vec<u8>) {
        put_varint(out, self.offset);
        put_varint(out, self.size);
    }

    fn decode(c: &mut Cursor<'_>) -> Parse<BlockHandle> {
        Ok(BlockHandle {
            offset: c.varint64()?,
            size: c.varint64()?,
        })
    }
}

/// `BlockBuilder`: prefix-compressed entries, a restart point every `interval` keys, then the
/// restart offsets and their count as fixed32s.
struct BlockBuilder {
    buf: Vec<u8>,
    restarts: Vec<u32>,
    counter: usize,
    interval: usize,
    last_key: Vec<u8>,
}

impl BlockBuilder {
    fn new(interval: usize) -> Self {
        BlockBuilder {
            buf: Vec::new(),
            restarts: vec![0],
            counter: 0,
            interval: interval.max(1),
            last_key: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn size_estimate(&self) -> usize {
        self.buf.len() + self.restarts.len() * 4 + 4
    }

    fn add(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let mut shared = 0;
        if self.counter < self.interval {
            shared = self.last_key.iter().zip(key).take_while(|(a, b)| a == b).count();
        } else {
            let at = u32::try_from(self.buf.len()).map_err(|_| Error::Argument("SSTable block over 4 GiB".into()))?;
            self.restarts.push(at);
            self.counter = 0;
        }
        let non_shared = key.len() - shared;
        for n in [shared, non_shared, value.len()] {
            if u32::try_from(n).is_err() {
                return Err(Error::Argument("SSTable key or value over 4 GiB".into()));
            }
            put_varint(&mut self.buf, n as u64);
        }
        self.buf.extend_from_slice(&key[shared..]);
        self.buf.extend_from_slice(value);
        self.last_key.truncate(shared);
        self.last_key.extend_from_slice(&key[shared..]);
        self.counter += 1;
        Ok(())
    }

    /// The finished block; the builder is reset for the next one.
    fn finish(&mut self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.buf);
        for &r in &self.restarts {
            put_fixed32(&mut buf, r);
        }
        put_fixed32(&mut buf, self.restarts.len() as u32);
        self.restarts = vec![0];
        self.counter = 0;
        self.last_key.clear();
        buf
    }
}

/// The shortest key k with `start <= k < limit` that TF's `FindShortestSeparator` picks.
fn shortest_separator(start: &mut Vec<u8>, limit: &[u8]) {
    let min_len = start.len().min(limit.len());
    let diff = start.iter().zip(limit).take_while(|(a, b)| a == b).count();
    if diff < min_len {
        let byte = start[diff];
        if byte < 0xff && u16::from(byte) + 1 < u16::from(limit[diff]) {
            start[diff] = byte + 1;
            start.truncate(diff + 1);
        }
    }
}

/// The shortest key >= `key` that TF's `FindShortSuccessor` picks.
fn short_successor(key: &mut Vec<u8>) {
    if let Some(i) = key.iter().position(|&b| b != 0xff) {
        key[i] += 1;
        key.truncate(i + 1);
    }
}

/// Builds a whole table in memory, as `table::TableBuilder` with TensorFlow's bundle options.
pub struct TableWriter {
    out: Vec<u8>,
    block_size: usize,
    data: BlockBuilder,
    index: BlockBuilder,
    last_key: Vec<u8>,
    num_entries: u64,
    pending: Option<BlockHandle>,
}

impl Default for TableWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl TableWriter {
    /// TensorFlow's options: 256 KiB blocks, restart interval 16, no compression.
    pub fn new() -> Self {
        Self::with_options(BLOCK_SIZE, RESTART_INTERVAL)
    }

    /// Other block sizes and restart intervals (LevelDB's knobs; TensorFlow never changes them).
    pub fn with_options(block_size: usize, restart_interval: usize) -> Self {
        TableWriter {
            out: Vec::new(),
            block_size,
            data: BlockBuilder::new(restart_interval),
            index: BlockBuilder::new(INDEX_RESTART_INTERVAL),
            last_key: Vec::new(),
            num_entries: 0,
            pending: None,
        }
    }

    /// Appends an entry; keys must be strictly increasing (bytewise).
    pub fn add(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        if self.num_entries > 0 {
            if key <= self.last_key.as_slice() {
                return Err(Error::Argument(format!(
                    "SSTable keys must be strictly increasing: {:?} after {:?}",
                    key.escape_ascii().to_string(),
                    self.last_key.escape_ascii().to_string()
                )));
            }
            // TF's kOverlyLargeBlockRatio: a huge entry gets a block of its own.
            if key.len().saturating_add(value.len()) >= self.block_size.saturating_mul(2) {
                self.flush();
            }
        }
        if let Some(handle) = self.pending.take() {
            shortest_separator(&mut self.last_key, key);
            let mut encoded = Vec::with_capacity(HANDLE_MAX_LEN);
            handle.encode_to(&mut encoded);
            self.index.add(&self.last_key, &encoded)?;
        }
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        self.num_entries += 1;
        self.data.add(key, value)?;
        if self.data.size_estimate() >= self.block_size {
            self.flush();
        }
        Ok(())
    }

    fn flush(&mut self) {
        if self.data.is_empty() {
            return;
        }
        let contents = self.data.finish();
        self.pending = Some(self.write_raw_block(&contents));
    }

    fn write_raw_block(&mut self, contents: &[u8]) -> BlockHandle {
        let handle = BlockHandle {
            offset: self.out.len() as u64,
            size: contents.len() as u64,
        };
        self.out.extend_from_slice(contents);
        let crc = crc32c::crc32c_append(crc32c::crc32c(contents), &[NO_COMPRESSION]);
        self.out.push(NO_COMPRESSION);
        put_fixed32(&mut self.out, super::mask_crc(crc));
        handle
    }

    /// Writes the last data block, the (empty) metaindex block, the index block and the footer.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        self.flush();
        let metaindex = BlockBuilder::new(RESTART_INTERVAL).finish();
        let metaindex_handle = self.write_raw_block(&metaindex);
        if let Some(handle) = self.pending.take() {
            short_successor(&mut self.last_key);
            let mut encoded = Vec::with_capacity(HANDLE_MAX_LEN);
            handle.encode_to(&mut encoded);
            self.index.add(&self.last_key, &encoded)?;
        }
        let index = self.index.finish();
        let index_handle = self.write_raw_block(&index);
        let footer_start = self.out.len();
        metaindex_handle.encode_to(&mut self.out);
        index_handle.encode_to(&mut self.out);
        self.out.resize(footer_start + 2 * HANDLE_MAX_LEN, 0);
        self.out.extend_from_slice(&MAGIC.to_le_bytes());
        Ok(self.out)
    }
}

/// Writes `entries` (strictly increasing keys) as a table with TensorFlow's options.
pub fn write_table<'a>(entries: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Result<Vec<u8>> {
    let mut writer = TableWriter::new();
    for (key, value) in entries {
        writer.add(key, value)?;
    }
    writer.finish()
}

/// One key/value of a table; the value borrows from the file's bytes.
pub type TableEntry<'a> = (Vec<u8>, &'a [u8]);

/// Checks a block's trailer (type byte, masked CRC32C) and returns its contents.
fn read_block<'a>(file: &'a [u8], handle: BlockHandle, end: usize, what: &str) -> Parse<&'a [u8]> {
    let start = usize::try_from(handle.offset).map_err(|_| format!("{what} offset out of range"))?;
    let size = usize::try_from(handle.size).map_err(|_| format!("{what} size out of range"))?;
    let stop = start
        .checked_add(size)
        .and_then(|s| s.checked_add(TRAILER_LEN))
        .filter(|&s| s <= end)
        .ok_or_else(|| format!("{what} (offset {start}, {size} bytes + trailer) runs past the blocks' end at {end}"))?;
    let (contents, trailer) = file[start..stop].split_at(size);
    let kind = trailer[0];
    let stored = u32::from_le_bytes([trailer[1], trailer[2], trailer[3], trailer[4]]);
    let actual = crc32c::crc32c_append(crc32c::crc32c(contents), &[kind]);
    if super::unmask_crc(stored) != actual {
        return Err(format!("{what} at offset {start}: block checksum mismatch"));
    }
    match kind {
        NO_COMPRESSION => Ok(contents),
        SNAPPY_COMPRESSION => Err(format!(
            "{what} at offset {start} is Snappy-compressed, which TensorFlow has not written since 1.1; unsupported"
        )),
        other => Err(format!("{what} at offset {start}: unknown block type {other}")),
    }
}

/// Decodes every entry of a block, checking its restart array and key prefixes. `budget` is what
/// is left of the key-expansion cap.
fn parse_block<'a>(contents: &'a [u8], what: &str, budget: &mut usize) -> Parse<Vec<TableEntry<'a>>> {
    let err = |msg: String| format!("{what}: {msg}");
    if contents.len() < 4 {
        return Err(err(format!("{} bytes, too short for a block", contents.len())));
    }
    let count_at = contents.len() - 4;
    let mut tail = Cursor::new(&contents[count_at..]);
    let num_restarts = tail.fixed32()? as usize;
    if num_restarts == 0 || num_restarts > count_at / 4 {
        return Err(err(format!(
            "{num_restarts} restart points do not fit a {}-byte block",
            contents.len()
        )));
    }
    let entries_end = count_at - 4 * num_restarts;
    let mut restarts = Cursor::new(&contents[entries_end..count_at]);
    let mut restart_offsets = Vec::with_capacity(num_restarts);
    for i in 0..num_restarts {
        let r = restarts.fixed32()? as usize;
        let ok = if i == 0 {
            r == 0
        } else {
            r > restart_offsets[i - 1] && r < entries_end
        };
        if !ok {
            return Err(err(format!("restart point {i} at {r} is out of order or out of range")));
        }
        restart_offsets.push(r);
    }
    let mut c = Cursor::new(&contents[..entries_end]);
    let mut entries: Vec<TableEntry<'a>> = Vec::new();
    let mut next_restart = 0;
    while !c.is_empty() {
        let at = c.pos();
        let shared = c.varint32().map_err(err)? as usize;
        let non_shared = c.varint32().map_err(err)?;
        let value_len = c.varint32().map_err(err)?;
        let delta = c.bytes(u64::from(non_shared)).map_err(err)?;
        let value = c.bytes(u64::from(value_len)).map_err(err)?;
        if restart_offsets.get(next_restart) == Some(&at) {
            if shared != 0 {
                return Err(err(format!("the entry at restart point {at} shares a prefix")));
            }
            next_restart += 1;
        }
        let prev: &[u8] = entries.last().map_or(&[], |e| e.0.as_slice());
        if shared > prev.len() {
            return Err(err(format!(
                "entry at {at} shares {shared} bytes of a {}-byte key",
                prev.len()
            )));
        }
        let len = shared + delta.len();
        *budget = budget
            .checked_sub(len)
            .ok_or_else(|| err("prefix-compressed keys expand far beyond the file's size".into()))?;
        let mut key = Vec::with_capacity(len);
        key.extend_from_slice(&prev[..shared]);
        key.extend_from_slice(delta);
        check_increasing(entries.last().map(|e| e.0.as_slice()), &key, what)?;
        entries.push((key, value));
    }
    // An empty block (the metaindex) has the one restart point 0 and no entry for it.
    if next_restart != num_restarts && entries_end > 0 {
        return Err(err(format!(
            "restart point {next_restart} is not at the start of an entry"
        )));
    }
    Ok(entries)
}

fn check_increasing(prev: Option<&[u8]>, key: &[u8], what: &str) -> Parse<()> {
    match prev {
        Some(p) if key <= p => Err(format!(
            "{what}: keys out of order: {:?} after {:?}",
            key.escape_ascii().to_string(),
            p.escape_ascii().to_string()
        )),
        _ => Ok(()),
    }
}

/// Reads and checks every entry of a table, in key order. Errors name `path`.
pub fn read_table<'a>(file: &'a [u8], path: &str) -> Result<Vec<TableEntry<'a>>> {
    parse_table(file).map_err(|msg| Error::format(path, format!("tensor bundle index: {msg}")))
}

fn parse_table(file: &[u8]) -> Parse<Vec<TableEntry<'_>>> {
    if file.len() < FOOTER_LEN {
        return Err(format!(
            "{} bytes, too short for an SSTable (footer is {FOOTER_LEN})",
            file.len()
        ));
    }
    let footer_at = file.len() - FOOTER_LEN;
    let mut footer = Cursor::new(&file[footer_at..]);
    let mut handles = Cursor::new(footer.bytes(2 * HANDLE_MAX_LEN as u64)?);
    if footer.fixed64()? != MAGIC {
        return Err("not an SSTable (bad magic number)".into());
    }
    let metaindex = BlockHandle::decode(&mut handles).map_err(|e| format!("footer: {e}"))?;
    let index = BlockHandle::decode(&mut handles).map_err(|e| format!("footer: {e}"))?;

    let mut budget = file.len().saturating_mul(KEY_EXPANSION_LIMIT).saturating_add(1024);
    // TensorFlow ignores the metaindex's contents, but its checksum and structure must hold.
    parse_block(
        read_block(file, metaindex, footer_at, "metaindex block")?,
        "metaindex block",
        &mut budget,
    )?;
    let index_entries = parse_block(
        read_block(file, index, footer_at, "index block")?,
        "index block",
        &mut budget,
    )?;

    let mut entries: Vec<TableEntry<'_>> = Vec::new();
    let mut blocks_end = 0u64;
    let mut prev_separator: Option<&[u8]> = None;
    for (i, (separator, value)) in index_entries.iter().enumerate() {
        let what = format!("data block {i}");
        check_increasing(prev_separator, separator, "index block")?;
        prev_separator = Some(separator);
        let mut c = Cursor::new(value);
        let handle = BlockHandle::decode(&mut c).map_err(|e| format!("index entry {i}: {e}"))?;
        if !c.is_empty() {
            return Err(format!("index entry {i}: trailing bytes after the block handle"));
        }
        // Blocks in file order, none overlapping: each is parsed once, so the work stays linear.
        if handle.offset < blocks_end {
            return Err(format!(
                "{what} at offset {} overlaps the block before it",
                handle.offset
            ));
        }
        let contents = read_block(file, handle, footer_at, &what)?;
        blocks_end = handle.offset + handle.size + TRAILER_LEN as u64;
        let block = parse_block(contents, &what, &mut budget)?;
        let (first, last) = match (block.first(), block.last()) {
            (Some(f), Some(l)) => (&f.0, &l.0),
            _ => return Err(format!("{what} is empty")),
        };
        check_increasing(entries.last().map(|e| e.0.as_slice()), first, &what)?;
        // The index key separates this block from the next: >= its last key (and < the next's first).
        if last.as_slice() > separator.as_slice() {
            return Err(format!("{what}: its last key sorts after its index key"));
        }
        if i > 0 && first.as_slice() <= index_entries[i - 1].0.as_slice() {
            return Err(format!(
                "{what}: its first key does not sort after the previous index key"
            ));
        }
        entries.extend(block);
    }
    for (what, handle) in [("metaindex block", metaindex), ("index block", index)] {
        if handle.offset < blocks_end {
            return Err(format!("{what} at offset {} overlaps the data blocks", handle.offset));
        }
    }
    Ok(entries)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The blocks of a valid table, as (offset, size): data blocks, metaindex, index.
    pub(in super::super) fn block_handles(file: &[u8]) -> Vec<(usize, usize)> {
        let footer_at = file.len() - FOOTER_LEN;
        let mut c = Cursor::new(&file[footer_at..]);
        let meta = BlockHandle::decode(&mut c).unwrap();
        let index = BlockHandle::decode(&mut c).unwrap();
        let mut budget = usize::MAX;
        let contents = read_block(file, index, footer_at, "index").unwrap();
        let mut out: Vec<(usize, usize)> = parse_block(contents, "index", &mut budget)
            .unwrap()
            .iter()
            .map(|(_, v)| {
                let h = BlockHandle::decode(&mut Cursor::new(v)).unwrap();
                (h.offset as usize, h.size as usize)
            })
            .collect();
        out.push((meta.offset as usize, meta.size as usize));
        out.push((index.offset as usize, index.size as usize));
        out
    }

    /// Rewrites the trailer checksum of the block at `(offset, size)`, so mutations reach the parser.
    pub(in super::super) fn fix_block_crc(file: &mut [u8], (offset, size): (usize, usize)) {
        let crc = crc32c::crc32c(&file[offset..offset + size + 1]);
        file[offset + size + 1..offset + size + 5].copy_from_slice(&super::super::mask_crc(crc).to_le_bytes());
    }

    fn table(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        write_table(pairs.iter().copied()).unwrap()
    }

    fn read(file: &[u8]) -> Parse<Vec<(Vec<u8>, Vec<u8>)>> {
        parse_table(file).map(|v| v.into_iter().map(|(k, v)| (k, v.to_vec())).collect())
    }

    #[test]
    fn empty_table_layout() {
        let t = table(&[]);
        // metaindex block (restart [0], count 1) + trailer, index block likewise, footer.
        assert_eq!(t.len(), 13 + 13 + FOOTER_LEN);
        assert_eq!(&t[..8], &[0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&t[t.len() - 8..], &MAGIC.to_le_bytes());
        assert_eq!(read(&t).unwrap(), vec![]);
    }

    #[test]
    fn prefix_compression_and_restarts() {
        let keys: Vec<Vec<u8>> = (0..40)
            .map(|i| format!("a/long/shared/prefix/{i:03}").into_bytes())
            .collect();
        let pairs: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (k.as_slice(), b"v".as_slice())).collect();
        let t = table(&pairs);
        let handles = block_handles(&t);
        assert_eq!(handles.len(), 3, "one data block");
        let (off, size) = handles[0];
        let block = &t[off..off + size];
        let n = u32::from_le_bytes(block[size - 4..].try_into().unwrap());
        assert_eq!(n, 3, "restarts at keys 0, 16 and 32");
        // Second entry shares everything but the last 3 digits' last byte.
        let first_len = 3 + keys[0].len() + 1;
        assert_eq!(&block[first_len..first_len + 3], &[keys[0].len() as u8 - 1, 1, 1]);
        let got = read(&t).unwrap();
        assert_eq!(got.len(), 40);
        assert!(got.iter().zip(&keys).all(|((k, v), want)| k == want && v == b"v"));
    }

    #[test]
    fn separators_follow_tensorflow() {
        let mut s = b"abcdef".to_vec();
        shortest_separator(&mut s, b"abzz");
        assert_eq!(s, b"abd");
        let mut s = b"abc".to_vec();
        shortest_separator(&mut s, b"abd");
        assert_eq!(s, b"abc", "diff byte + 1 is not < limit's");
        let mut s = b"ab".to_vec();
        shortest_separator(&mut s, b"abc");
        assert_eq!(s, b"ab", "prefix");
        let mut s = vec![0xff, 0xff, 3];
        short_successor(&mut s);
        assert_eq!(s, vec![0xff, 0xff, 4]);
        let mut s = vec![0xff, 0xff];
        short_successor(&mut s);
        assert_eq!(s, vec![0xff, 0xff]);
    }

    #[test]
    fn small_blocks_and_a_huge_entry() {
        let mut w = TableWriter::with_options(64, 4);
        let keys: Vec<Vec<u8>> = (0..50).map(|i| format!("key{i:04}").into_bytes()).collect();
        for k in &keys {
            w.add(k, b"0123456789").unwrap();
        }
        let big = vec![7u8; 200];
        w.add(b"z", &big).unwrap();
        let t = w.finish().unwrap();
        let handles = block_handles(&t);
        assert!(handles.len() > 5);
        let got = read(&t).unwrap();
        assert_eq!(got.len(), 51);
        assert_eq!(got[50].1, big);
        // The huge entry sits alone in the last data block.
        let last_data = handles[handles.len() - 3];
        assert_eq!(
            last_data.1,
            4 + 1 + 200 + 8,
            "varints 0, 1, 200 (2 bytes); key; value; restarts"
        );
    }

    #[test]
    fn writer_refuses_unsorted_keys() {
        let mut w = TableWriter::new();
        w.add(b"b", b"").unwrap();
        assert!(w.add(b"a", b"").is_err());
        assert!(w.add(b"b", b"").is_err());
    }

    #[test]
    fn reader_refuses_malformed_tables() {
        let good = table(&[(b"a", b"1"), (b"b", b"2")]);
        assert!(read(&good).is_ok());
        assert!(read(&good[..good.len() - 1]).unwrap_err().contains("magic"));
        assert!(read(&good[1..]).is_err());
        assert!(read(&[0u8; 47]).unwrap_err().contains("too short"));

        let handles = block_handles(&good);
        let (off, size) = handles[0];
        // Bad checksum.
        let mut bad = good.clone();
        bad[off] ^= 1;
        assert!(read(&bad).unwrap_err().contains("checksum"));
        // Unknown and Snappy block types.
        for (kind, msg) in [(1u8, "Snappy"), (9, "unknown block type")] {
            let mut bad = good.clone();
            bad[off + size] = kind;
            fix_block_crc(&mut bad, (off, size));
            assert!(read(&bad).unwrap_err().contains(msg));
        }
        // Restart count larger than the block.
        let mut bad = good.clone();
        bad[off + size - 4..off + size].copy_from_slice(&1000u32.to_le_bytes());
        fix_block_crc(&mut bad, (off, size));
        assert!(read(&bad).unwrap_err().contains("restart points"));
        // Restart offset out of range.
        let mut bad = good.clone();
        bad[off + size - 8..off + size - 4].copy_from_slice(&3u32.to_le_bytes());
        fix_block_crc(&mut bad, (off, size));
        assert!(read(&bad).unwrap_err().contains("restart point"));
        // Keys out of order: swap "a" and "b".
        let mut bad = good.clone();
        bad[off + 3] = b'c';
        fix_block_crc(&mut bad, (off, size));
        assert!(read(&bad).unwrap_err().contains("out of order"));
        // Shared prefix longer than the previous key.
        let mut bad = good.clone();
        bad[off + 5] = 5;
        fix_block_crc(&mut bad, (off, size));
        assert!(read(&bad).is_err());
        // Varint overflow in an entry.
        let mut bad = good.clone();
        bad[off..off + 5].copy_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x7f]);
        fix_block_crc(&mut bad, (off, size));
        assert!(read(&bad).unwrap_err().contains("overflows"));
        // Index handle pointing past the end of the file.
        let footer_at = good.len() - FOOTER_LEN;
        let mut bad = good.clone();
        bad[footer_at + 3..footer_at + 6].copy_from_slice(&[0xff, 0xff, 0x7f]);
        assert!(read(&bad).is_err());
    }

    #[test]
    fn key_expansion_is_capped() {
        // One restart point, then thousands of entries each repeating a 4 KiB+ key plus one byte.
        let mut block = Vec::new();
        put_varint(&mut block, 0);
        put_varint(&mut block, 4096);
        put_varint(&mut block, 0);
        block.extend(std::iter::repeat_n(b'k', 4096));
        for i in 0..20_000u64 {
            // Each key extends the previous one by a byte: shared = all of it, non_shared 1, value 0.
            put_varint(&mut block, 4096 + i);
            block.extend_from_slice(&[1, 0, b'k']);
        }
        block.extend_from_slice(&0u32.to_le_bytes());
        block.extend_from_slice(&1u32.to_le_bytes());
        let mut budget = block.len() * KEY_EXPANSION_LIMIT;
        assert!(parse_block(&block, "block", &mut budget)
            .unwrap_err()
            .contains("expand"));
    }

    proptest! {
        #[test]
        fn round_trip(map in prop::collection::btree_map(
            prop::collection::vec(any::<u8>(), 0..40),
            prop::collection::vec(any::<u8>(), 0..300),
            0..200,
        ), block_size in 32usize..4096, interval in 1usize..20) {
            let mut w = TableWriter::with_options(block_size, interval);
            for (k, v) in &map {
                w.add(k, v).unwrap();
            }
            let t = w.finish().unwrap();
            let got = read(&t).unwrap();
            let want: Vec<(Vec<u8>, Vec<u8>)> = map.into_iter().collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), magic in any::<bool>()) {
            let mut bytes = bytes;
            if magic && bytes.len() >= 8 {
                let n = bytes.len();
                bytes[n - 8..].copy_from_slice(&MAGIC.to_le_bytes());
            }
            let _ = read(&bytes);
        }
    }
}
