//! `BundleHeaderProto` and `BundleEntryProto` (tensorflow/core/protobuf/tensor_bundle.proto), with the
//! `TensorShapeProto`, `TensorSliceProto` and `VersionDef` they embed.
//!
//! Hand-written rather than `prost`: six small proto3 messages, and what matters is byte identity with
//! TensorFlow's C++ serializer (fields in number order; proto3 scalars omitted when zero; `shape` and
//! `version` always present because TF calls `mutable_shape()` / `mutable_version()`; an extent's
//! `length` emitted whenever set, as a oneof member) plus strict, allocation-bounded decoding with our
//! own messages. That is ~250 lines here against two crates and a derive macro stack to compile.
//!
//! Decoding follows protobuf's rules where TensorFlow's parser would accept the bytes (unknown fields
//! skipped, repeated scalars last-wins, repeated sub-messages merged, int32 fields truncated from 64-bit
//! varints, packed or unpacked `bad_consumers`) but refuses what it cannot trust: truncated or
//! overlong varints, groups, and known fields with the wrong wire type.
//!
//! Partitioned variables: an entry with `slices` is the metadata of a tensor saved in slices under other
//! keys (`BundleWriter::AddSlice`). Its slices are decoded, validated and re-encoded byte for byte, so an
//! index round-trips whole; a loader that does not assemble slices checks [`TensorEntry::is_partitioned`]
//! and falls back, rather than the whole index being refused.

use super::sstable::{put_varint, Cursor, Parse};

/// `DataType` enum values (tensorflow/core/framework/types.proto) used by name in this crate.
pub mod dtype {
    pub const DT_INVALID: i32 = 0;
    pub const DT_FLOAT: i32 = 1;
    pub const DT_DOUBLE: i32 = 2;
    pub const DT_INT32: i32 = 3;
    pub const DT_INT8: i32 = 6;
    pub const DT_STRING: i32 = 7;
    pub const DT_INT64: i32 = 9;
    pub const DT_BOOL: i32 = 10;
    pub const DT_BFLOAT16: i32 = 14;
    pub const DT_HALF: i32 = 19;
    pub const DT_RESOURCE: i32 = 20;
    pub const DT_VARIANT: i32 = 21;
}
use dtype::DT_RESOURCE;

/// Name and element size in bytes (`DataTypeSize`; 0 = variable-length) of every `DataType` TensorFlow
/// 2.21 defines, indexed by enum value.
const DTYPES: [(&str, u64); 34] = [
    ("invalid", 0),
    ("float32", 4),
    ("float64", 8),
    ("int32", 4),
    ("uint8", 1),
    ("int16", 2),
    ("int8", 1),
    ("string", 0),
    ("complex64", 8),
    ("int64", 8),
    ("bool", 1),
    ("qint8", 1),
    ("quint8", 1),
    ("qint32", 4),
    ("bfloat16", 2),
    ("qint16", 2),
    ("quint16", 2),
    ("uint16", 2),
    ("complex128", 16),
    ("float16", 2),
    ("resource", 0),
    ("variant", 0),
    ("uint32", 4),
    ("uint64", 8),
    ("float8_e5m2", 1),
    ("float8_e4m3fn", 1),
    ("float8_e4m3fnuz", 1),
    ("float8_e4m3b11fnuz", 1),
    ("float8_e5m2fnuz", 1),
    ("int4", 1),
    ("uint4", 1),
    ("int2", 1),
    ("uint2", 1),
    ("float4_e2m1fn", 1),
];

/// The dtype's name ("float32", "bfloat16", ...), or None for values TensorFlow does not define.
pub fn dtype_name(dtype: i32) -> Option<&'static str> {
    usize::try_from(dtype).ok().and_then(|i| DTYPES.get(i)).map(|d| d.0)
}

/// Bytes per element of a fixed-size dtype; None for strings, variants, resources and unknown values.
pub fn dtype_size(dtype: i32) -> Option<u64> {
    usize::try_from(dtype)
        .ok()
        .and_then(|i| DTYPES.get(i))
        .map(|d| d.1)
        .filter(|&s| s > 0)
}

/// `TensorShape::kMaxDimensions`.
pub const MAX_RANK: usize = 254;

/// `VersionDef` (tensorflow/core/framework/versions.proto).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionDef {
    pub producer: i32,
    pub min_consumer: i32,
    pub bad_consumers: Vec<i32>,
}

/// `BundleHeaderProto`, the value of the index's "" key. Endianness is always LITTLE: `read_index`
/// refuses big-endian bundles, whose tensor bytes would need swapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleHeader {
    pub num_shards: i32,
    pub version: VersionDef,
}

/// `kTensorBundleVersion`: what TensorFlow writes as `version.producer`, and the consumer version it
/// checks `min_consumer` / `bad_consumers` against.
pub const BUNDLE_VERSION: i32 = 1;

impl Default for BundleHeader {
    /// What `BundleWriter::Finish` writes: one shard, LITTLE, `version { producer: 1 }`.
    fn default() -> Self {
        BundleHeader {
            num_shards: 1,
            version: VersionDef {
                producer: BUNDLE_VERSION,
                min_consumer: 0,
                bad_consumers: Vec::new(),
            },
        }
    }
}

/// One dimension of a slice (`TensorSliceProto.Extent`): `length` None means the whole dimension.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SliceExtent {
    pub start: i64,
    pub length: Option<i64>,
}

/// One tensor's `BundleEntryProto` under its key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TensorEntry {
    pub key: Vec<u8>,
    /// A `DataType` enum value (see [`dtype`]).
    pub dtype: i32,
    /// Dimension sizes; empty for a scalar.
    pub shape: Vec<i64>,
    /// Which `prefix.data-NNNNN-of-MMMMM` file holds the bytes.
    pub shard_id: i32,
    /// Where the bytes start in that file.
    pub offset: u64,
    /// How many bytes.
    pub size: u64,
    /// CRC32C of the bytes (for DT_STRING, of what `WriteStringTensor` checksums), unmasked.
    pub crc32c: u32,
    /// The slices saved under other keys, for a partitioned tensor; empty otherwise.
    pub slices: Vec<Vec<SliceExtent>>,
}

impl TensorEntry {
    /// A tensor saved whole, with offset, size and checksum still to fill in.
    pub fn new(key: impl Into<Vec<u8>>, dtype: i32, shape: Vec<i64>) -> Self {
        TensorEntry {
            key: key.into(),
            dtype,
            shape,
            ..Default::default()
        }
    }

    /// Elements in the tensor (1 for a scalar); None if a dimension is negative or the product overflows i64.
    pub fn num_elements(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1i64, |n, &d| if d < 0 { None } else { n.checked_mul(d) })
            .map(|n| n as u64)
    }

    /// Metadata of a partitioned tensor: its data lives under the slices' own keys.
    pub fn is_partitioned(&self) -> bool {
        !self.slices.is_empty()
    }

    /// The key, printable (non-UTF-8 bytes escaped).
    pub fn key_display(&self) -> String {
        self.key.escape_ascii().to_string()
    }

    /// Serializes the value as TensorFlow's proto serializer does.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + 3 * self.shape.len());
        put_int(&mut out, 1, i64::from(self.dtype));
        let mut shape = Vec::with_capacity(4 * self.shape.len());
        for &d in &self.shape {
            let mut dim = Vec::new();
            put_int(&mut dim, 1, d);
            put_len(&mut shape, 2, &dim);
        }
        put_len(&mut out, 2, &shape);
        put_int(&mut out, 3, i64::from(self.shard_id));
        put_int(&mut out, 4, self.offset as i64);
        put_int(&mut out, 5, self.size as i64);
        let masked = super::mask_crc(self.crc32c);
        if masked != 0 {
            put_tag(&mut out, 6, WIRE_FIXED32);
            out.extend_from_slice(&masked.to_le_bytes());
        }
        for slice in &self.slices {
            let mut s = Vec::new();
            for e in slice {
                let mut extent = Vec::new();
                put_int(&mut extent, 1, e.start);
                if let Some(length) = e.length {
                    put_tag(&mut extent, 2, WIRE_VARINT);
                    put_varint(&mut extent, length as u64);
                }
                put_len(&mut s, 1, &extent);
            }
            put_len(&mut out, 7, &s);
        }
        out
    }

    /// Parses and validates a value read under `key`.
    pub(super) fn decode(key: Vec<u8>, value: &[u8]) -> Parse<TensorEntry> {
        let raw = RawEntry::decode(value)?;
        raw.validate(key)
    }
}

impl BundleHeader {
    /// Serializes the value as TensorFlow's proto serializer does (`08 01 1a 02 08 01` for the default).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8);
        put_int(&mut out, 1, i64::from(self.num_shards));
        // endianness (field 2): LITTLE = 0, omitted.
        let mut version = Vec::new();
        put_int(&mut version, 1, i64::from(self.version.producer));
        put_int(&mut version, 2, i64::from(self.version.min_consumer));
        if !self.version.bad_consumers.is_empty() {
            let mut packed = Vec::new();
            for &b in &self.version.bad_consumers {
                put_varint(&mut packed, i64::from(b) as u64);
            }
            put_len(&mut version, 3, &packed);
        }
        put_len(&mut out, 3, &version);
        out
    }

    /// Parses a header and applies `BundleReader`'s checks (`CheckVersions` against consumer 1).
    pub(super) fn decode(value: &[u8]) -> Parse<BundleHeader> {
        let mut header = BundleHeader {
            num_shards: 0,
            version: VersionDef {
                producer: 0,
                min_consumer: 0,
                bad_consumers: Vec::new(),
            },
        };
        let mut endianness = 0;
        let mut c = Cursor::new(value);
        while let Some((field, wire)) = next_field(&mut c)? {
            match (field, wire) {
                (1, Wire::Varint(v)) => header.num_shards = v as i32,
                (2, Wire::Varint(v)) => endianness = v as i32,
                (3, Wire::Len(b)) => decode_version(b, &mut header.version)?,
                (1..=3, _) => return Err(format!("header field {field} has the wrong wire type")),
                _ => {}
            }
        }
        match endianness {
            0 => {}
            1 => return Err("big-endian tensor bundle: unsupported".into()),
            e => return Err(format!("header: unknown endianness {e}")),
        }
        if header.num_shards < 1 {
            return Err(format!("header: {} shards", header.num_shards));
        }
        let v = &header.version;
        if v.producer < 0 {
            return Err(format!("header: producer version {} is below 0", v.producer));
        }
        if v.min_consumer > BUNDLE_VERSION {
            return Err(format!(
                "header: needs a reader of version {} or later (this one is {BUNDLE_VERSION})",
                v.min_consumer
            ));
        }
        if v.bad_consumers.contains(&BUNDLE_VERSION) {
            return Err(format!("header: reader version {BUNDLE_VERSION} is listed as bad"));
        }
        Ok(header)
    }
}

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

fn put_tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, u64::from(field << 3 | u32::from(wire)));
}

/// A proto3 int32/int64/enum field with implicit presence: omitted when 0, negatives as 10-byte varints.
fn put_int(out: &mut Vec<u8>, field: u32, v: i64) {
    if v != 0 {
        put_tag(out, field, WIRE_VARINT);
        put_varint(out, v as u64);
    }
}

/// A sub-message (always emitted, even when empty).
fn put_len(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_tag(out, field, WIRE_LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

enum Wire<'a> {
    Varint(u64),
    Fixed64,
    Len(&'a [u8]),
    Fixed32(u32),
}

fn next_field<'a>(c: &mut Cursor<'a>) -> Parse<Option<(u32, Wire<'a>)>> {
    if c.is_empty() {
        return Ok(None);
    }
    let tag = c.varint64()?;
    let field = u32::try_from(tag >> 3).ok().filter(|f| (1..1 << 29).contains(f));
    let field = field.ok_or_else(|| format!("bad protobuf field number {}", tag >> 3))?;
    let wire = match (tag & 7) as u8 {
        WIRE_VARINT => Wire::Varint(c.varint64()?),
        WIRE_FIXED64 => {
            c.fixed64()?;
            Wire::Fixed64
        }
        WIRE_LEN => {
            let n = c.varint64()?;
            Wire::Len(c.bytes(n)?)
        }
        WIRE_FIXED32 => Wire::Fixed32(c.fixed32()?),
        w => return Err(format!("protobuf wire type {w} (group or invalid) in field {field}")),
    };
    Ok(Some((field, wire)))
}

fn decode_version(bytes: &[u8], v: &mut VersionDef) -> Parse<()> {
    let mut c = Cursor::new(bytes);
    while let Some((field, wire)) = next_field(&mut c)? {
        match (field, wire) {
            (1, Wire::Varint(x)) => v.producer = x as i32,
            (2, Wire::Varint(x)) => v.min_consumer = x as i32,
            (3, Wire::Varint(x)) => v.bad_consumers.push(x as i32),
            (3, Wire::Len(b)) => {
                let mut p = Cursor::new(b);
                while !p.is_empty() {
                    v.bad_consumers.push(p.varint64()? as i32);
                }
            }
            (1..=3, _) => return Err(format!("version field {field} has the wrong wire type")),
            _ => {}
        }
    }
    Ok(())
}

/// The fields as parsed, before validation.
#[derive(Default)]
struct RawEntry {
    dtype: i32,
    dims: Vec<i64>,
    unknown_rank: bool,
    shard_id: i32,
    offset: i64,
    size: i64,
    crc32c: u32,
    slices: Vec<Vec<SliceExtent>>,
}

impl RawEntry {
    fn decode(value: &[u8]) -> Parse<RawEntry> {
        let mut e = RawEntry::default();
        let mut c = Cursor::new(value);
        while let Some((field, wire)) = next_field(&mut c)? {
            match (field, wire) {
                (1, Wire::Varint(v)) => e.dtype = v as i32,
                (2, Wire::Len(b)) => e.decode_shape(b)?,
                (3, Wire::Varint(v)) => e.shard_id = v as i32,
                (4, Wire::Varint(v)) => e.offset = v as i64,
                (5, Wire::Varint(v)) => e.size = v as i64,
                (6, Wire::Fixed32(v)) => e.crc32c = v,
                (7, Wire::Len(b)) => e.slices.push(decode_slice(b)?),
                (1..=7, _) => return Err(format!("entry field {field} has the wrong wire type")),
                _ => {}
            }
        }
        Ok(e)
    }

    /// Merges a `TensorShapeProto` (dims append, as protobuf merges repeated sub-messages). Dimension
    /// names, which TensorFlow never writes into bundles and its reader ignores, are skipped.
    fn decode_shape(&mut self, bytes: &[u8]) -> Parse<()> {
        let mut c = Cursor::new(bytes);
        while let Some((field, wire)) = next_field(&mut c)? {
            match (field, wire) {
                (2, Wire::Len(b)) => {
                    let mut size = 0i64;
                    let mut d = Cursor::new(b);
                    while let Some((field, wire)) = next_field(&mut d)? {
                        match (field, wire) {
                            (1, Wire::Varint(v)) => size = v as i64,
                            (2, Wire::Len(_)) => {}
                            (1 | 2, _) => return Err(format!("shape dim field {field} has the wrong wire type")),
                            _ => {}
                        }
                    }
                    self.dims.push(size);
                }
                (3, Wire::Varint(v)) => self.unknown_rank = v != 0,
                (2 | 3, _) => return Err(format!("shape field {field} has the wrong wire type")),
                _ => {}
            }
        }
        Ok(())
    }

    fn validate(self, key: Vec<u8>) -> Parse<TensorEntry> {
        let name = dtype_name(self.dtype);
        if name.is_none() || matches!(self.dtype, dtype::DT_INVALID | DT_RESOURCE) {
            return Err(format!("dtype {} is not a type a tensor bundle can hold", self.dtype));
        }
        if self.unknown_rank {
            return Err("shape of unknown rank".into());
        }
        if self.dims.len() > MAX_RANK {
            return Err(format!("rank {} exceeds {MAX_RANK}", self.dims.len()));
        }
        if let Some(d) = self.dims.iter().find(|&&d| d < 0) {
            return Err(format!("negative dimension {d} in shape {:?}", self.dims));
        }
        if self.shard_id < 0 || self.offset < 0 || self.size < 0 {
            return Err(format!(
                "negative shard ({}), offset ({}) or size ({})",
                self.shard_id, self.offset, self.size
            ));
        }
        let entry = TensorEntry {
            key,
            dtype: self.dtype,
            shape: self.dims,
            shard_id: self.shard_id,
            offset: self.offset as u64,
            size: self.size as u64,
            crc32c: super::unmask_crc(self.crc32c),
            slices: self.slices,
        };
        let n = entry
            .num_elements()
            .ok_or_else(|| format!("shape {:?} has more than 2^63 elements", entry.shape))?;
        if entry.is_partitioned() {
            for slice in &entry.slices {
                if slice.len() != entry.shape.len() {
                    return Err(format!("a slice of rank {} for shape {:?}", slice.len(), entry.shape));
                }
                for (e, &dim) in slice.iter().zip(&entry.shape) {
                    let end = e
                        .length
                        .map_or(Some(e.start), |l| if l < 0 { None } else { e.start.checked_add(l) });
                    if e.start < 0 || end.is_none_or(|end| end > dim) {
                        return Err(format!("slice extent {e:?} outside dimension {dim}"));
                    }
                }
            }
        } else if let Some(width) = dtype_size(entry.dtype) {
            // BundleReader::GetValue: the size must be exactly the tensor's bytes.
            let want = n.checked_mul(width);
            if want != Some(entry.size) {
                return Err(format!(
                    "{} bytes stored for a {} tensor of shape {:?}",
                    entry.size,
                    name.unwrap_or_default(),
                    entry.shape
                ));
            }
        } else if entry.size < n {
            // BundleReader::GetValue's lower bound for strings (and variants): a varint byte per element.
            return Err(format!(
                "{} bytes stored for {n} {}s",
                entry.size,
                name.unwrap_or_default()
            ));
        }
        Ok(entry)
    }
}

fn decode_slice(bytes: &[u8]) -> Parse<Vec<SliceExtent>> {
    let mut extents = Vec::new();
    let mut c = Cursor::new(bytes);
    while let Some((field, wire)) = next_field(&mut c)? {
        match (field, wire) {
            (1, Wire::Len(b)) => {
                let mut e = SliceExtent::default();
                let mut x = Cursor::new(b);
                while let Some((field, wire)) = next_field(&mut x)? {
                    match (field, wire) {
                        (1, Wire::Varint(v)) => e.start = v as i64,
                        (2, Wire::Varint(v)) => e.length = Some(v as i64),
                        (1 | 2, _) => return Err(format!("slice extent field {field} has the wrong wire type")),
                        _ => {}
                    }
                }
                extents.push(e);
            }
            (1, _) => return Err("slice field 1 has the wrong wire type".into()),
            _ => {}
        }
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn header_bytes_match_tensorflow() {
        assert_eq!(BundleHeader::default().encode(), hex("08011a020801"));
        assert_eq!(
            BundleHeader::decode(&hex("08011a020801")).unwrap(),
            BundleHeader::default()
        );
    }

    #[test]
    fn header_checks() {
        let big = hex("080110011a020801");
        assert!(BundleHeader::decode(&big).unwrap_err().contains("big-endian"));
        let no_shards = hex("1a020801");
        assert!(BundleHeader::decode(&no_shards).unwrap_err().contains("0 shards"));
        let future = hex("08011a0408011002");
        assert!(BundleHeader::decode(&future).unwrap_err().contains("version 2"));
        // bad_consumers, packed and unpacked.
        for bytes in ["08011a05 0801 1a0101", "08011a04 0801 1801"] {
            let bytes = hex(&bytes.replace(' ', ""));
            assert!(BundleHeader::decode(&bytes).unwrap_err().contains("bad"));
        }
        let h = BundleHeader {
            num_shards: 3,
            version: VersionDef {
                producer: 1,
                min_consumer: 0,
                bad_consumers: vec![5, 7],
            },
        };
        assert_eq!(BundleHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn entry_bytes_match_tensorflow() {
        // From a TF 2.21 checkpoint: float32 scalar at offset 0, 4 bytes.
        let scalar = hex("080112002804355e2fe1a7");
        let e = TensorEntry::decode(b"k".to_vec(), &scalar).unwrap();
        assert_eq!((e.dtype, e.shape.as_slice(), e.offset, e.size), (1, &[][..], 0, 4));
        assert_eq!(e.encode(), scalar);
        // float32 of shape (0, 3): a zero dimension is an empty Dim message; size 0 omitted;
        // crc32c of nothing masks to 0xa282ead8.
        let empty = hex("08011206120012020803204a35d8ea82a2");
        let e = TensorEntry::decode(b"k".to_vec(), &empty).unwrap();
        assert_eq!(
            (e.shape.as_slice(), e.offset, e.size, e.crc32c),
            (&[0, 3][..], 74, 0, 0)
        );
        assert_eq!(e.encode(), empty);
        // Partitioned metadata: extent{length 2}, extent{} (full).
        let sliced = hex("0801120812020804120208023a060a0210020a00");
        let e = TensorEntry::decode(b"k".to_vec(), &sliced).unwrap();
        assert_eq!(
            e.slices,
            vec![vec![
                SliceExtent {
                    start: 0,
                    length: Some(2)
                },
                SliceExtent { start: 0, length: None }
            ]]
        );
        assert!(e.is_partitioned());
        assert_eq!(e.encode(), sliced);
    }

    fn cat(mut head: Vec<u8>, tail: &str) -> Vec<u8> {
        head.extend(hex(&tail.replace(' ', "")));
        head
    }

    #[test]
    fn protobuf_rules() {
        let base = TensorEntry {
            key: b"k".to_vec(),
            dtype: 1,
            shape: vec![2],
            size: 8,
            crc32c: 77,
            ..Default::default()
        };
        let bytes = base.encode();
        // Unknown fields of every wire type are skipped.
        let with_unknown = cat(bytes.clone(), "4001 4905000000000000aa 5202abcd 5d01020304");
        assert_eq!(TensorEntry::decode(b"k".to_vec(), &with_unknown).unwrap(), base);
        // A repeated scalar: last wins. A repeated sub-message: merged.
        let again = cat(bytes.clone(), "2808 12021200");
        let e = TensorEntry::decode(b"k".to_vec(), &again);
        assert!(
            e.unwrap_err().contains("bytes stored"),
            "shape (2, 0) holds 0 bytes, not 8"
        );
        // Wrong wire type for a known field, a group, truncation, overlong varints.
        for bad in [
            "0d01000000",
            "0b",
            "0801120512",
            "08ffffffffffffffffff7f",
            "08ffffffffffffffffff02",
        ] {
            let bad = hex(&bad.replace(' ', ""));
            assert!(TensorEntry::decode(b"k".to_vec(), &bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn validation() {
        let ok = |e: &TensorEntry| TensorEntry::decode(e.key.clone(), &e.encode());
        let base = TensorEntry {
            key: b"k".to_vec(),
            dtype: 1,
            shape: vec![2, 3],
            size: 24,
            ..Default::default()
        };
        assert_eq!(ok(&base).unwrap(), base);
        for (e, msg) in [
            (
                TensorEntry {
                    dtype: 0,
                    ..base.clone()
                },
                "dtype",
            ),
            (
                TensorEntry {
                    dtype: 20,
                    ..base.clone()
                },
                "dtype",
            ),
            (
                TensorEntry {
                    dtype: 99,
                    ..base.clone()
                },
                "dtype",
            ),
            (
                TensorEntry {
                    size: 23,
                    ..base.clone()
                },
                "bytes stored",
            ),
            (
                TensorEntry {
                    shape: vec![-1, 3],
                    ..base.clone()
                },
                "negative dimension",
            ),
            (
                TensorEntry {
                    shape: vec![1 << 40, 1 << 40],
                    ..base.clone()
                },
                "2^63",
            ),
            (
                TensorEntry {
                    shape: vec![1; 255],
                    size: 4,
                    ..base.clone()
                },
                "rank",
            ),
            (
                TensorEntry {
                    shard_id: -1,
                    ..base.clone()
                },
                "negative",
            ),
            (
                TensorEntry {
                    offset: u64::MAX,
                    ..base.clone()
                },
                "negative",
            ),
            (
                TensorEntry {
                    dtype: dtype::DT_STRING,
                    size: 5,
                    ..base.clone()
                },
                "strings",
            ),
            (
                TensorEntry {
                    slices: vec![vec![SliceExtent {
                        start: 1,
                        length: Some(2),
                    }]],
                    ..base.clone()
                },
                "rank",
            ),
            (
                TensorEntry {
                    slices: vec![vec![
                        SliceExtent {
                            start: 1,
                            length: Some(2),
                        },
                        SliceExtent::default(),
                    ]],
                    ..base.clone()
                },
                "outside",
            ),
        ] {
            let err = ok(&e).unwrap_err();
            assert!(err.contains(msg), "{err} lacks {msg}");
        }
        let mut unknown_rank = base.encode();
        unknown_rank.extend_from_slice(&hex("12021801"));
        assert!(TensorEntry::decode(b"k".to_vec(), &unknown_rank)
            .unwrap_err()
            .contains("unknown rank"));
    }

    fn arb_entry() -> impl Strategy<Value = TensorEntry> {
        (
            prop::sample::select(vec![1, 2, 3, 7, 9, 10, 14, 19, 21, 23, 33]),
            prop::collection::vec(0i64..5, 0..4),
            0i32..4,
            0u64..(1 << 40),
            any::<u32>(),
            any::<bool>(),
        )
            .prop_map(|(dtype, shape, shard_id, offset, crc32c, sliced)| {
                let n = shape.iter().product::<i64>() as u64;
                let mut e = TensorEntry {
                    key: b"key".to_vec(),
                    dtype,
                    size: dtype_size(dtype).map_or(n + 4, |w| n * w),
                    shape,
                    shard_id,
                    offset,
                    crc32c,
                    slices: Vec::new(),
                };
                if sliced {
                    e.slices = vec![e
                        .shape
                        .iter()
                        .map(|&d| SliceExtent {
                            start: 0,
                            length: Some(d),
                        })
                        .collect()];
                }
                e
            })
    }

    proptest! {
        #[test]
        fn entry_round_trip(e in arb_entry()) {
            let bytes = e.encode();
            prop_assert_eq!(TensorEntry::decode(e.key.clone(), &bytes).unwrap(), e);
        }

        #[test]
        fn random_values_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = TensorEntry::decode(b"k".to_vec(), &bytes);
            let _ = BundleHeader::decode(&bytes);
        }
    }
}
