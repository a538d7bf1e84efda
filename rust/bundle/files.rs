//! A tensor bundle on disk: writing a bundle (`prefix.index` + `prefix.data-00000-of-00001`, or N
//! shards `prefix.data-0000i-of-0000N` written by one [`BundleWriter`] each) and reading any bundle whose entries are whole tensors, through the crate's one tensor path
//! ([`crate::io`]: positioned parallel writes/reads, CRC32C computed chunk by chunk on the way).
//!
//! Writing follows `BundleWriter` as `SaveV2` + `MergeV2Checkpoints` drive it for one shard: tensors
//! packed in the order given, the index sorted by key, the header `{num_shards: 1, LITTLE, version 1}`.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{
    data_file_name, decode_string_tensor, dtype, dtype_size, encode_string_tensor, plan_data_layout, read_index,
    write_index, BundleHeader, TensorEntry,
};
use crate::error::{Error, Result};
use crate::io::{read_tensors_with, write_tensors_with, Crc32c};

/// A tensor's content: raw little-endian bytes of a fixed-size dtype, or DT_STRING elements.
pub enum TensorData<'a> {
    Bytes(&'a [u8]),
    Strings(Vec<Vec<u8>>),
}

/// One tensor to save under `key`.
pub struct BundleTensor<'a> {
    pub key: Vec<u8>,
    pub dtype: i32,
    pub shape: Vec<i64>,
    pub data: TensorData<'a>,
}

/// Writes a single-shard bundle whose data file is `data` (new and empty): the tensors packed in the
/// given order, in parallel, each checksummed on the way; returns the `.index` file's bytes.
pub fn write_bundle(data: &File, data_path: &Path, tensors: &[BundleTensor<'_>], threads: usize) -> Result<Vec<u8>> {
    let mut writer = BundleWriter::default();
    writer.add(data, data_path, tensors, threads)?;
    writer.finish(data, data_path)
}

/// A single-shard bundle written batch by batch: each [`BundleWriter::add`] packs its tensors right after
/// the previous batch's, so a caller can write the tensors it knows early (on another thread, while it
/// works out the rest), then [`BundleWriter::finish`] gives the index of all of them.
#[derive(Debug, Default)]
pub struct BundleWriter {
    entries: Vec<TensorEntry>,
    end: u64,
}

impl BundleWriter {
    /// Tensors written so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of data written so far.
    pub fn data_len(&self) -> u64 {
        self.end
    }

    /// Writes `tensors` into `data` after those already written, in parallel, CRC32C computed on the way.
    pub fn add(&mut self, data: &File, data_path: &Path, tensors: &[BundleTensor<'_>], threads: usize) -> Result<()> {
        let mut entries = Vec::with_capacity(tensors.len());
        let mut encoded: Vec<Option<EncodedStrings>> = Vec::with_capacity(tensors.len());
        for t in tensors {
            let (entry, enc) = planned_entry(t)?;
            entries.push(entry);
            encoded.push(enc);
        }
        let batch_len = plan_data_layout(&mut entries)?;
        let end = self
            .end
            .checked_add(batch_len)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| Error::Argument("tensor bundle data over 2^63 bytes".into()))?;
        for e in &mut entries {
            e.offset += self.end;
        }
        let pieces: Vec<(u64, &[u8])> = entries
            .iter()
            .zip(tensors.iter().zip(&encoded))
            .map(|(e, (t, enc))| match (&t.data, enc) {
                (_, Some((bytes, _))) => (e.offset, &bytes[..]),
                (TensorData::Bytes(bytes), None) => (e.offset, *bytes),
                (TensorData::Strings(_), None) => unreachable!("strings are always encoded"),
            })
            .collect();
        let crcs = write_tensors_with::<Crc32c>(data, data_path, &pieces, threads)?;
        for ((entry, crc), enc) in entries.iter_mut().zip(crcs).zip(&encoded) {
            // A string tensor's checksum covers its length words, not the varints written: the encoder's.
            entry.crc32c = enc.as_ref().map_or(crc, |(_, string_crc)| *string_crc);
        }
        self.entries.extend(entries);
        self.end = end;
        Ok(())
    }

    /// Sets the data file's length to what was written and returns the `.index` file's bytes.
    pub fn finish(&self, data: &File, data_path: &Path) -> Result<Vec<u8>> {
        self.finish_data(data, data_path)?;
        write_index(&BundleHeader::default(), &self.entries)
    }

    /// Sets the data file's length to what was written (a shard of [`sharded_index`]).
    pub fn finish_data(&self, data: &File, data_path: &Path) -> Result<()> {
        data.set_len(self.end).map_err(|e| Error::io(data_path, "truncate", e))
    }

    /// Forgets everything written, to start the data file over.
    pub fn reset(&mut self, data: &File, data_path: &Path) -> Result<()> {
        self.entries.clear();
        self.end = 0;
        data.set_len(0).map_err(|e| Error::io(data_path, "truncate", e))
    }
}

/// The `.index` file's bytes of a bundle whose data shard `i` (`prefix.data-0000i-of-0000N`) was
/// written by `shards[i]`: every entry under its shard, as `MergeV2Checkpoints` merges per-shard indexes.
pub fn sharded_index(shards: &[&BundleWriter]) -> Result<Vec<u8>> {
    let num_shards = i32::try_from(shards.len())
        .ok()
        .filter(|&n| n >= 1)
        .ok_or_else(|| Error::Argument(format!("tensor bundle: {} shards", shards.len())))?;
    let mut entries = Vec::with_capacity(shards.iter().map(|w| w.entries.len()).sum());
    for (shard_id, writer) in (0..num_shards).zip(shards) {
        entries.extend(writer.entries.iter().cloned().map(|mut e| {
            if !e.is_partitioned() {
                e.shard_id = shard_id;
            }
            e
        }));
    }
    let header = BundleHeader {
        num_shards,
        ..BundleHeader::default()
    };
    write_index(&header, &entries)
}

/// A DT_STRING tensor's data-file bytes and its entry's CRC32C.
type EncodedStrings = (Vec<u8>, u32);

/// A tensor's entry (offset and checksum still to come) and, for strings, their encoding.
fn planned_entry(t: &BundleTensor<'_>) -> Result<(TensorEntry, Option<EncodedStrings>)> {
    let mut entry = TensorEntry::new(t.key.clone(), t.dtype, t.shape.clone());
    let shown = entry.key_display();
    let n = entry
        .num_elements()
        .ok_or_else(|| Error::Argument(format!("tensor {shown:?}: bad shape {:?}", t.shape)))?;
    match &t.data {
        TensorData::Bytes(bytes) => {
            let width = dtype_size(t.dtype).ok_or_else(|| {
                Error::Argument(format!("tensor {shown:?}: dtype {} has no fixed element size", t.dtype))
            })?;
            if n.checked_mul(width) != Some(bytes.len() as u64) {
                return Err(Error::Argument(format!(
                    "tensor {shown:?}: {} bytes for shape {:?} of dtype {}",
                    bytes.len(),
                    t.shape,
                    t.dtype
                )));
            }
            entry.size = bytes.len() as u64;
            Ok((entry, None))
        }
        TensorData::Strings(elements) => {
            if t.dtype != dtype::DT_STRING || elements.len() as u64 != n {
                return Err(Error::Argument(format!(
                    "tensor {shown:?}: {} strings for shape {:?} of dtype {}",
                    elements.len(),
                    t.shape,
                    t.dtype
                )));
            }
            let (bytes, crc) = encode_string_tensor(elements);
            entry.size = bytes.len() as u64;
            Ok((entry, Some((bytes, crc))))
        }
    }
}

/// `prefix` with `suffix` appended (paths need not be UTF-8).
fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(prefix.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

/// An open bundle: its validated index, and its data shards opened and measured.
pub struct BundleFiles {
    pub index_path: PathBuf,
    pub header: BundleHeader,
    /// In key order.
    pub entries: Vec<TensorEntry>,
    shards: Vec<(PathBuf, File)>,
}

impl BundleFiles {
    /// Reads and validates `prefix.index`, opens every `prefix.data-NNNNN-of-MMMMM` and checks that each
    /// entry's bytes lie inside its shard. Nothing of the data is read yet.
    pub fn open(prefix: &Path) -> Result<Self> {
        let index_path = with_suffix(prefix, ".index");
        let index = std::fs::read(&index_path).map_err(|e| Error::io(&index_path, "read", e))?;
        let (header, entries) = read_index(&index, &index_path.display().to_string())?;
        let num_shards = u32::try_from(header.num_shards).unwrap_or(0);
        let mut shards = Vec::new();
        let mut lengths = Vec::new();
        for shard in 0..num_shards {
            let path = with_suffix(prefix, &data_file_name("", shard, num_shards));
            let file = File::open(&path).map_err(|e| Error::io(&path, "open", e))?;
            let len = file.metadata().map_err(|e| Error::io(&path, "stat", e))?.len();
            lengths.push(len);
            shards.push((path, file));
        }
        let shown = match &shards[..] {
            [(only, _)] => only.display().to_string(),
            _ => with_suffix(prefix, ".data-*").display().to_string(),
        };
        super::check_shards(&header, &entries, &lengths, &shown)?;
        Ok(BundleFiles {
            index_path,
            header,
            entries,
            shards,
        })
    }

    /// The position of `key`'s entry in [`Self::entries`].
    pub fn find(&self, key: &[u8]) -> Option<usize> {
        self.entries.binary_search_by(|e| e.key.as_slice().cmp(key)).ok()
    }

    fn shard_of(&self, entry: &TensorEntry) -> Result<&(PathBuf, File)> {
        usize::try_from(entry.shard_id)
            .ok()
            .and_then(|i| self.shards.get(i))
            .ok_or_else(|| {
                Error::format(
                    &self.index_path,
                    format!("entry {:?}: no such shard", entry.key_display()),
                )
            })
    }

    /// Fills each buffer with the bytes of entry `index` (whole, fixed-size dtypes only), in parallel, and
    /// checks each against its CRC32C. Buffers must be exactly the entries' sizes and must not overlap.
    pub fn read_into(&self, requests: &mut [(usize, &mut [u8])], threads: usize) -> Result<()> {
        for (index, buffer) in requests.iter() {
            let e = self
                .entries
                .get(*index)
                .ok_or_else(|| Error::Argument(format!("no entry {index}")))?;
            if e.is_partitioned() || dtype_size(e.dtype).is_none() || buffer.len() as u64 != e.size {
                return Err(Error::Argument(format!(
                    "entry {:?} cannot be read into {} bytes as a whole fixed-size tensor",
                    e.key_display(),
                    buffer.len()
                )));
            }
        }
        for (shard, (path, file)) in self.shards.iter().enumerate() {
            let mut mine: Vec<(usize, (u64, &mut [u8]))> = requests
                .iter_mut()
                .filter(|(i, _)| usize::try_from(self.entries[*i].shard_id).ok() == Some(shard))
                .map(|(i, b)| (*i, (self.entries[*i].offset, &mut **b)))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let mut spans: Vec<(u64, &mut [u8])> = mine.iter_mut().map(|(_, (o, b))| (*o, &mut **b)).collect();
            let crcs = read_tensors_with::<Crc32c>(file, path, &mut spans, threads)?;
            for ((index, _), crc) in mine.iter().zip(crcs) {
                let e = &self.entries[*index];
                if crc != e.crc32c {
                    return Err(Error::format(
                        path,
                        format!(
                            "tensor bundle entry {:?} ({} bytes at {}): checksum does not match",
                            e.key_display(),
                            e.size,
                            e.offset
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The elements of DT_STRING entry `index`, checksums checked.
    pub fn read_strings(&self, index: usize) -> Result<Vec<Vec<u8>>> {
        let e = self
            .entries
            .get(index)
            .ok_or_else(|| Error::Argument(format!("no entry {index}")))?;
        let (path, file) = self.shard_of(e)?;
        let len = usize::try_from(e.size).map_err(|_| Error::format(path, "string tensor too large"))?;
        let mut data = vec![0u8; len];
        file.read_exact_at(&mut data, e.offset).map_err(|err| {
            if err.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::format(
                    path,
                    format!("file is truncated: {len} bytes expected at offset {}", e.offset),
                )
            } else {
                Error::io(path, "read", err)
            }
        })?;
        let elements = decode_string_tensor(e, &data, &path.display().to_string())?;
        Ok(elements.into_iter().map(<[u8]>::to_vec).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, tensors: &[BundleTensor<'_>]) -> PathBuf {
        let prefix = dir.join("ckpt");
        let data_path = with_suffix(&prefix, ".data-00000-of-00001");
        let data = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&data_path)
            .unwrap();
        let index = write_bundle(&data, &data_path, tensors, 2).unwrap();
        std::fs::write(with_suffix(&prefix, ".index"), index).unwrap();
        prefix
    }

    #[test]
    fn round_trip_in_given_order() {
        let dir = tempfile::tempdir().unwrap();
        let floats: Vec<u8> = (0..24u8).collect();
        let ints: Vec<u8> = (100..108u8).collect();
        let tensors = [
            BundleTensor {
                key: b"zz".to_vec(),
                dtype: dtype::DT_FLOAT,
                shape: vec![2, 3],
                data: TensorData::Bytes(&floats),
            },
            BundleTensor {
                key: b"aa".to_vec(),
                dtype: dtype::DT_INT64,
                shape: vec![],
                data: TensorData::Bytes(&ints),
            },
            BundleTensor {
                key: b"_CHECKPOINTABLE_OBJECT_GRAPH".to_vec(),
                dtype: dtype::DT_STRING,
                shape: vec![],
                data: TensorData::Strings(vec![b"graph".to_vec()]),
            },
        ];
        let prefix = write(dir.path(), &tensors);
        let bundle = BundleFiles::open(&prefix).unwrap();
        let zz = bundle.find(b"zz").unwrap();
        let aa = bundle.find(b"aa").unwrap();
        assert_eq!((bundle.entries[zz].offset, bundle.entries[aa].offset), (0, 24));
        let (mut a, mut z) = (vec![0u8; 8], vec![0u8; 24]);
        bundle.read_into(&mut [(aa, &mut a[..]), (zz, &mut z[..])], 2).unwrap();
        assert_eq!((a, z), (ints.clone(), floats.clone()));
        let g = bundle.find(b"_CHECKPOINTABLE_OBJECT_GRAPH").unwrap();
        assert_eq!(bundle.read_strings(g).unwrap(), vec![b"graph".to_vec()]);

        // A flipped data byte is a format error naming the data file.
        let data_path = with_suffix(&prefix, ".data-00000-of-00001");
        let mut bytes = std::fs::read(&data_path).unwrap();
        bytes[3] ^= 1;
        std::fs::write(&data_path, &bytes).unwrap();
        let bundle = BundleFiles::open(&prefix).unwrap();
        let mut z = [0u8; 24];
        let err = bundle.read_into(&mut [(zz, &mut z[..])], 1).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err}");
        assert!(err.to_string().contains("data-00000-of-00001"), "{err}");

        // A truncated data file is caught when the bundle is opened.
        std::fs::write(&data_path, &bytes[..10]).unwrap();
        let err = BundleFiles::open(&prefix).err().unwrap();
        assert!(matches!(err, Error::Format { .. }), "{err}");
    }

    #[test]
    fn batches_pack_like_one_call() {
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<u8> = (0..12u8).collect();
        let b: Vec<u8> = (50..54u8).collect();
        let tensor = |key: &[u8], bytes| BundleTensor {
            key: key.to_vec(),
            dtype: dtype::DT_FLOAT,
            shape: vec![],
            data: TensorData::Bytes(bytes),
        };
        let whole_prefix = write(dir.path(), &[tensor(b"z", &a[..4]), tensor(b"a", &b)]);
        let whole = std::fs::read(with_suffix(&whole_prefix, ".index")).unwrap();
        let path = dir.path().join("batched.data");
        let data = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut writer = BundleWriter::default();
        writer.add(&data, &path, &[tensor(b"q", &a[4..8])], 1).unwrap();
        writer.reset(&data, &path).unwrap();
        writer.add(&data, &path, &[tensor(b"z", &a[..4])], 1).unwrap();
        writer.add(&data, &path, &[tensor(b"a", &b)], 1).unwrap();
        assert_eq!((writer.len(), writer.data_len()), (2, 8));
        assert_eq!(writer.finish(&data, &path).unwrap(), whole);
        let whole_data = std::fs::read(with_suffix(&whole_prefix, ".data-00000-of-00001")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), whole_data);
    }

    #[test]
    fn wrong_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data_path = dir.path().join("d");
        let data = File::create(&data_path).unwrap();
        let short = [0u8; 3];
        let t = BundleTensor {
            key: b"k".to_vec(),
            dtype: dtype::DT_FLOAT,
            shape: vec![1],
            data: TensorData::Bytes(&short),
        };
        assert!(matches!(
            write_bundle(&data, &data_path, &[t], 1),
            Err(Error::Argument(_))
        ));
    }
}
