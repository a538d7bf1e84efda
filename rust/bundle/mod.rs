//! TensorFlow's tensor bundle: the `variables/variables.index` + `variables/variables.data-00000-of-00001`
//! of a SavedModel, and the `prefix.index` + `prefix.data-*` of a TF checkpoint. Pure Rust, no pyo3.
//!
//! Specs: tensorflow/core/util/tensor_bundle/tensor_bundle.cc (`BundleWriter`, `BundleReader`),
//! tensorflow/core/protobuf/tensor_bundle.proto, LevelDB doc/table_format.md as TF's
//! tsl/lib/io/table_builder.cc + block_builder.cc + format.cc implement it. Facts checked against
//! files TensorFlow 2.21 writes (rust/bundle/testdata/gen_fixtures.py):
//! - `.index`: an SSTable ([`sstable`]) mapping "" to a [`BundleHeader`] and every other key, sorted
//!   bytewise, to a [`TensorEntry`] (`BundleEntryProto`, [`entry`]).
//! - `.data-*`: tensors packed back to back, alignment 1, in the order `BundleWriter::Add` was called,
//!   which is `SaveV2`'s input order (object-graph order for `tf.train.Checkpoint`, with
//!   `_CHECKPOINTABLE_OBJECT_GRAPH` last), not key order. Fixed-size dtypes are their raw little-endian
//!   bytes and the entry's CRC32C covers exactly them; DT_STRING is laid out as [`encode_string_tensor`] says.
//! - Every CRC in the format is CRC32C stored masked ([`mask_crc`]).
//!
//! The API is plain data: plan offsets ([`plan_data_layout`]), write the tensor bytes however the caller
//! likes (in parallel, at those offsets), then [`write_index`]. Reading: [`read_index`] validates every
//! entry, [`check_shards`] fits them into the data files, [`verify_tensor`] checks bytes against an entry.

pub mod entry;
pub mod files;
pub mod sstable;
#[cfg(test)]
mod tests;

pub use entry::{dtype, dtype_name, dtype_size, BundleHeader, SliceExtent, TensorEntry, VersionDef};

use crate::error::{Error, Result};
use sstable::{put_varint, Cursor};

/// The key of the header entry (`kHeaderEntryKey`), first in every index.
pub const HEADER_KEY: &[u8] = b"";
/// The key of the serialized `TrackableObjectGraph` (a DT_STRING scalar) in TF2 checkpoints and SavedModels.
pub const OBJECT_GRAPH_KEY: &[u8] = b"_CHECKPOINTABLE_OBJECT_GRAPH";

const MASK_DELTA: u32 = 0xa282_ead8;

/// TensorFlow's (and LevelDB's) `crc32c::Mask`: `((crc >> 15) | (crc << 17)) + 0xa282ead8`.
pub fn mask_crc(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(MASK_DELTA)
}

/// `crc32c::Unmask`, the inverse of [`mask_crc`].
pub fn unmask_crc(masked: u32) -> u32 {
    masked.wrapping_sub(MASK_DELTA).rotate_left(15)
}

/// CRC32C (Castagnoli) of `data`, hardware-accelerated where the CPU has it.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Extends a running CRC32C over the next piece: `crc32c_append(crc32c(a), b) == crc32c(a ++ b)`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// CRC32C of `a ++ b` from `crc32c(a)`, `crc32c(b)` and `b.len()`: for pieces checksummed in parallel.
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    crc32c::crc32c_combine(crc_a, crc_b, len_b)
}

/// `MetaFilename`: "prefix.index".
pub fn index_file_name(prefix: &str) -> String {
    format!("{prefix}.index")
}

/// `DataFilename`: "prefix.data-00000-of-00001".
pub fn data_file_name(prefix: &str, shard: u32, num_shards: u32) -> String {
    format!("{prefix}.data-{shard:05}-of-{num_shards:05}")
}

/// Assigns each entry its place in a single data shard, packed in the given order as `BundleWriter::Add`
/// packs them (alignment 1, no padding): `shard_id` 0 and `offset` the sum of the sizes before it.
/// Partitioned entries hold no bytes and are left alone. Returns the data file's length.
pub fn plan_data_layout(entries: &mut [TensorEntry]) -> Result<u64> {
    let mut end = 0u64;
    for e in entries.iter_mut().filter(|e| !e.is_partitioned()) {
        e.shard_id = 0;
        e.offset = end;
        end = end
            .checked_add(e.size)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| Error::Argument("tensor bundle data over 2^63 bytes".into()))?;
    }
    Ok(end)
}

/// The whole `.index` file: `header` under "", then the entries sorted by key, as `BundleWriter::Finish`
/// writes it. Keys must be unique and non-empty.
pub fn write_index(header: &BundleHeader, entries: &[TensorEntry]) -> Result<Vec<u8>> {
    let mut sorted: Vec<&TensorEntry> = entries.iter().collect();
    sorted.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    if let Some(w) = sorted.windows(2).find(|w| w[0].key == w[1].key) {
        return Err(Error::Argument(format!(
            "tensor bundle: duplicate key {:?}",
            w[0].key_display()
        )));
    }
    if sorted.first().is_some_and(|e| e.key.is_empty()) {
        return Err(Error::Argument(
            "tensor bundle: the empty key is reserved for the header".into(),
        ));
    }
    let mut table = sstable::TableWriter::new();
    table.add(HEADER_KEY, &header.encode())?;
    for e in sorted {
        table.add(&e.key, &e.encode())?;
    }
    table.finish()
}

/// Reads and validates a whole `.index` file: the SSTable's structure and checksums, the header
/// (LITTLE endian, versions TF 2.21 accepts), and every entry (known dtype, shape of at most 254
/// non-negative dimensions whose element count fits i64, size matching the shape for fixed-size dtypes,
/// shard id below the header's `num_shards`). Entries come back in key order, the header excluded.
pub fn read_index(bytes: &[u8], path: &str) -> Result<(BundleHeader, Vec<TensorEntry>)> {
    let table = sstable::read_table(bytes, path)?;
    let mut pairs = table.into_iter();
    let header = match pairs.next() {
        Some((key, value)) if key.is_empty() => {
            BundleHeader::decode(value).map_err(|msg| Error::format(path, format!("tensor bundle header: {msg}")))?
        }
        _ => {
            return Err(Error::format(
                path,
                "tensor bundle index has no header entry (key \"\")",
            ))
        }
    };
    let mut entries = Vec::new();
    for (key, value) in pairs {
        let shown = key.escape_ascii().to_string();
        let e = TensorEntry::decode(key, value)
            .map_err(|msg| Error::format(path, format!("tensor bundle entry {shown:?}: {msg}")))?;
        if e.shard_id >= header.num_shards {
            return Err(Error::format(
                path,
                format!(
                    "tensor bundle entry {shown:?}: shard {} of {}",
                    e.shard_id, header.num_shards
                ),
            ));
        }
        entries.push(e);
    }
    Ok((header, entries))
}

/// Checks that every entry's bytes lie inside its data shard, given each shard file's length
/// (`shard_lengths[i]` for `data_file_name(prefix, i, num_shards)`).
pub fn check_shards(header: &BundleHeader, entries: &[TensorEntry], shard_lengths: &[u64], path: &str) -> Result<()> {
    if usize::try_from(header.num_shards).ok() != Some(shard_lengths.len()) {
        return Err(Error::Argument(format!(
            "{path}: {} data shard lengths for a bundle of {} shards",
            shard_lengths.len(),
            header.num_shards
        )));
    }
    for e in entries.iter().filter(|e| !e.is_partitioned()) {
        let len = usize::try_from(e.shard_id).ok().and_then(|i| shard_lengths.get(i));
        let end = e.offset.checked_add(e.size);
        match (len, end) {
            (Some(&len), Some(end)) if end <= len => {}
            _ => {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor bundle entry {:?}: bytes {}..{} lie outside data shard {} ({} bytes)",
                        e.key_display(),
                        e.offset,
                        e.offset.saturating_add(e.size),
                        e.shard_id,
                        len.map_or("missing".into(), |l| l.to_string())
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// Checks a tensor's bytes (`data` = the `entry.size` bytes at `entry.offset` of its shard) against the
/// entry's CRC32C, as `BundleReader::GetValue` does; DT_STRING tensors are decoded to check them.
pub fn verify_tensor(entry: &TensorEntry, data: &[u8], path: &str) -> Result<()> {
    check_data_len(entry, data)?;
    match entry.dtype {
        dtype::DT_STRING => decode_string_tensor(entry, data, path).map(|_| ()),
        dtype::DT_VARIANT => Err(Error::format(
            path,
            format!(
                "tensor bundle entry {:?}: DT_VARIANT tensors are not supported",
                entry.key_display()
            ),
        )),
        _ if crc32c(data) != entry.crc32c => Err(checksum_error(entry, path)),
        _ => Ok(()),
    }
}

fn check_data_len(entry: &TensorEntry, data: &[u8]) -> Result<()> {
    if entry.is_partitioned() {
        return Err(Error::Argument(format!(
            "tensor bundle entry {:?} is partitioned: its bytes are under its slices' keys",
            entry.key_display()
        )));
    }
    if data.len() as u64 != entry.size {
        return Err(Error::Argument(format!(
            "tensor bundle entry {:?} has {} bytes, {} given",
            entry.key_display(),
            entry.size,
            data.len()
        )));
    }
    Ok(())
}

fn checksum_error(entry: &TensorEntry, path: &str) -> Error {
    Error::format(
        path,
        format!(
            "tensor bundle entry {:?} (shard {}, {} bytes at {}): checksum does not match",
            entry.key_display(),
            entry.shard_id,
            entry.size,
            entry.offset
        ),
    )
}

fn varint_len(v: u64) -> u64 {
    u64::from((64 - (v | 1).leading_zeros()).div_ceil(7))
}

/// `WriteStringTensor` checksums each length as a little-endian uint32 (uint64 above 4 GiB), not as
/// the varint it writes.
fn extend_with_length(crc: u32, len: u64) -> u32 {
    match u32::try_from(len) {
        Ok(l) => crc32c_append(crc, &l.to_le_bytes()),
        Err(_) => crc32c_append(crc, &len.to_le_bytes()),
    }
}

/// Bytes [`encode_string_tensor`] produces for these elements: the entry's `size`, for layout planning.
pub fn string_tensor_size<S: AsRef<[u8]>>(elements: &[S]) -> u64 {
    elements
        .iter()
        .map(|s| s.as_ref().len() as u64)
        .map(|n| varint_len(n) + n)
        .sum::<u64>()
        + 4
}

/// A DT_STRING tensor's data-file bytes and its entry's (unmasked) CRC32C, as `WriteStringTensor` makes
/// them: a varint64 length per element; the masked CRC32C of the lengths (each as a 4-byte LE word) as
/// 4 LE bytes; then the elements' bytes. The entry's CRC covers the length words, those 4 checksum
/// bytes and the elements' bytes, not the varints. An empty tensor is just the 4 checksum bytes.
pub fn encode_string_tensor<S: AsRef<[u8]>>(elements: &[S]) -> (Vec<u8>, u32) {
    let mut out = Vec::with_capacity(usize::try_from(string_tensor_size(elements)).unwrap_or(0));
    let mut crc = 0;
    for s in elements {
        let len = s.as_ref().len() as u64;
        put_varint(&mut out, len);
        crc = extend_with_length(crc, len);
    }
    let length_checksum = mask_crc(crc).to_le_bytes();
    out.extend_from_slice(&length_checksum);
    crc = crc32c_append(crc, &length_checksum);
    for s in elements {
        out.extend_from_slice(s.as_ref());
        crc = crc32c_append(crc, s.as_ref());
    }
    (out, crc)
}

/// Decodes a DT_STRING tensor's bytes (`data` = its `entry.size` bytes), checking the length checksum,
/// the entry's CRC32C and that the elements fill `data` exactly. Elements borrow from `data`.
pub fn decode_string_tensor<'a>(entry: &TensorEntry, data: &'a [u8], path: &str) -> Result<Vec<&'a [u8]>> {
    check_data_len(entry, data)?;
    if entry.dtype != dtype::DT_STRING {
        return Err(Error::Argument(format!(
            "tensor bundle entry {:?} is not DT_STRING",
            entry.key_display()
        )));
    }
    let bad = |msg: String| Error::format(path, format!("tensor bundle entry {:?}: {msg}", entry.key_display()));
    let n = entry
        .num_elements()
        .ok_or_else(|| bad(format!("bad shape {:?}", entry.shape)))?;
    // ReadStringTensor reads nothing from an empty range; the checksum then is that of nothing.
    if data.is_empty() {
        if n != 0 {
            return Err(bad(format!("0 bytes for {n} strings")));
        }
        return if entry.crc32c == 0 {
            Ok(Vec::new())
        } else {
            Err(checksum_error(entry, path))
        };
    }
    // Each element needs at least one varint byte: never allocate more than the data could describe.
    if n > data.len() as u64 {
        return Err(bad(format!("{} bytes cannot hold {n} strings", data.len())));
    }
    let mut c = Cursor::new(data);
    let mut lengths = Vec::with_capacity(n as usize);
    let mut crc = 0;
    for i in 0..n {
        let len = c.varint64().map_err(|m| bad(format!("length of string {i}: {m}")))?;
        crc = extend_with_length(crc, len);
        lengths.push(len);
    }
    let stored = c.fixed32().map_err(|m| bad(format!("length checksum: {m}")))?;
    if unmask_crc(stored) != crc {
        return Err(bad("the string lengths' checksum does not match".into()));
    }
    crc = crc32c_append(crc, &stored.to_le_bytes());
    let mut elements = Vec::with_capacity(lengths.len());
    for (i, &len) in lengths.iter().enumerate() {
        let s = c.bytes(len).map_err(|m| bad(format!("string {i}: {m}")))?;
        crc = crc32c_append(crc, s);
        elements.push(s);
    }
    if !c.is_empty() {
        return Err(bad(format!("{} bytes after the last string", data.len() - c.pos())));
    }
    if crc != entry.crc32c {
        return Err(checksum_error(entry, path));
    }
    Ok(elements)
}
