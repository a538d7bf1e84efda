//! HDF5's filter pipeline for one chunk, both ways: byte shuffle, deflate (ISA-L, libdeflate), zstd
//! (registered filter 32015, a plain zstd frame as hdf5plugin writes it) and Fletcher-32, in the
//! order h5py's `create_dataset(shuffle=..., compression=..., fletcher32=...)` sets them up.

use std::borrow::Cow;
use std::cell::RefCell;

use super::shuffle::{shuffle, unshuffle, unshuffle_into};

/// What is wrong with a chunk; the caller names the file and dataset.
pub type Result<T> = std::result::Result<T, String>;

/// HDF5 filter identifiers.
pub const DEFLATE: u16 = 1;
pub const SHUFFLE: u16 = 2;
pub const FLETCHER32: u16 = 3;
pub const ZSTD: u16 = 32015;

/// How a chunk's bytes were (or are to be) filtered, in pipeline order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    pub filters: Vec<u16>,
    /// The codec's level (deflate 0-9, zstd 1-22); unused when decoding.
    pub level: i32,
    /// Element size in bytes, the shuffle filter's parameter.
    pub itemsize: usize,
}

impl Pipeline {
    /// Whether every filter is one of ours (the rest go to libhdf5 through h5py).
    pub fn supported(filters: &[u16]) -> bool {
        filters
            .iter()
            .all(|f| matches!(*f, DEFLATE | SHUFFLE | FLETCHER32 | ZSTD))
    }

    /// Runs the pipeline forward over one chunk's raw bytes: what HDF5 stores for it.
    pub fn encode(&self, raw: &[u8]) -> Result<Vec<u8>> {
        // The raw chunk is the caller's tensor: borrowed until a filter makes new bytes.
        let mut data: Cow<[u8]> = Cow::Borrowed(raw);
        for &filter in &self.filters {
            data = Cow::Owned(match filter {
                SHUFFLE => shuffle(&data, self.itemsize),
                DEFLATE => deflate(&data, self.level)?,
                ZSTD => compress_zstd(&data, self.level)?,
                FLETCHER32 => {
                    let sum = fletcher32(&data);
                    let mut data = data.into_owned();
                    data.reserve_exact(4); // not the doubling `extend` would make of a shrunk buffer
                    data.extend_from_slice(&sum.to_le_bytes());
                    data
                }
                other => return Err(format!("HDF5 filter {other} is not supported here")),
            });
        }
        Ok(data.into_owned())
    }

    /// Runs the pipeline backwards over a stored chunk: its raw bytes, exactly `len` of them.
    /// `skipped` is the chunk's filter mask: bit i set means filter i was not applied to it.
    pub fn decode(&self, stored: Vec<u8>, skipped: u32, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        self.decode_into(stored, skipped, &mut out)?;
        Ok(out)
    }

    /// As `decode`, into `out` (exactly the raw length): the last filter undone writes there.
    pub fn decode_into(&self, stored: Vec<u8>, skipped: u32, out: &mut [u8]) -> Result<()> {
        let len = out.len();
        let undo: Vec<u16> = (self.filters.iter().enumerate().rev())
            .filter(|&(i, _)| i >= 32 || skipped & (1 << i) == 0)
            .map(|(_, &filter)| filter)
            .collect();
        let mut data = stored;
        for (n, &filter) in undo.iter().enumerate() {
            let last = n + 1 == undo.len();
            data = match filter {
                FLETCHER32 => strip_fletcher32(data)?,
                DEFLATE if last => return exactly(inflate_into(&data, out)?, len),
                DEFLATE => inflate(&data, len)?,
                ZSTD if last => return exactly(unzstd_into(&data, out)?, len),
                ZSTD => unzstd(&data, len)?,
                SHUFFLE if last => {
                    exactly(data.len(), len)?;
                    unshuffle_into(&data, self.itemsize, out);
                    return Ok(());
                }
                SHUFFLE => unshuffle(&data, self.itemsize),
                other => return Err(format!("HDF5 filter {other} is not supported here")),
            };
        }
        exactly(data.len(), len)?;
        out.copy_from_slice(&data);
        Ok(())
    }
}

/// A chunk decoded to `got` bytes is whole only with the `len` of its shape.
fn exactly(got: usize, len: usize) -> Result<()> {
    if got != len {
        return Err(format!("a chunk decodes to {got} bytes, not the {len} of its shape"));
    }
    Ok(())
}

/// HDF5's Fletcher-32 (H5_checksum_fletcher32): big-endian 16-bit words, sums folded every 360 words.
pub fn fletcher32(data: &[u8]) -> u32 {
    let (mut sum1, mut sum2) = (0u32, 0u32);
    let words = data.chunks_exact(2);
    let odd = words.remainder().first().copied();
    let mut count = 0;
    for word in words {
        sum1 += u32::from(u16::from_be_bytes([word[0], word[1]]));
        sum2 += sum1;
        count += 1;
        if count == 360 {
            (sum1, sum2, count) = (fold(sum1), fold(sum2), 0);
        }
    }
    if count != 0 {
        (sum1, sum2) = (fold(sum1), fold(sum2));
    }
    if let Some(byte) = odd {
        sum1 += u32::from(byte) << 8;
        sum2 += sum1;
        (sum1, sum2) = (fold(sum1), fold(sum2));
    }
    (fold(sum2) << 16) | fold(sum1)
}

fn fold(sum: u32) -> u32 {
    (sum & 0xffff) + (sum >> 16)
}

/// Checks and removes the trailing checksum. libhdf5 also accepts it byte-swapped, which
/// HDF5 releases before 1.6.3 wrote (H5Zfletcher32.c).
fn strip_fletcher32(mut data: Vec<u8>) -> Result<Vec<u8>> {
    let Some(body) = data.len().checked_sub(4) else {
        return Err("a chunk is too short to hold its Fletcher-32 checksum".into());
    };
    let stored = u32::from_le_bytes([data[body], data[body + 1], data[body + 2], data[body + 3]]);
    let sum = fletcher32(&data[..body]);
    let swapped = ((sum & 0x00ff_00ff) << 8) | ((sum & 0xff00_ff00) >> 8);
    if stored != sum && stored != swapped {
        return Err("a chunk fails its Fletcher-32 checksum (corrupted data)".into());
    }
    data.truncate(body);
    Ok(data)
}

/// A zlib stream, as HDF5's deflate filter stores it: levels 1-3 by ISA-L (its levels 1 and 3;
/// several times libdeflate's speed on weights), the others, and anything ISA-L refuses, by libdeflate.
/// Never inlined: ISA-L's stream state is ~240 KiB on the stack, which inlined into rayon's
/// recursive splitting sat in every level of it and overflowed a worker's stack (SIGSEGV).
#[inline(never)]
fn deflate(data: &[u8], level: i32) -> Result<Vec<u8>> {
    let fast = match level {
        1 => Some(isal::CompressionLevel::One),
        2 | 3 => Some(isal::CompressionLevel::Three),
        _ => None,
    };
    if let Some(fast) = fast {
        // Stateless: the whole chunk in one call; an output that does not fit is an error, not a
        // partial stream. Room for stored blocks' headers; libdeflate takes over if even that is short.
        let mut out = vec![0u8; data.len() + data.len() / 1024 + 1024];
        if let Ok(n) = isal::compress_into(data, &mut out, fast, isal::Codec::Zlib) {
            out.truncate(n);
            out.shrink_to_fit(); // held until HDF5 stores it: no slack beside it
            return Ok(out);
        }
    }
    let lvl = libdeflater::CompressionLvl::new(level).map_err(|_| format!("deflate level {level}"))?;
    let mut compressor = libdeflater::Compressor::new(lvl);
    let mut out = vec![0u8; compressor.zlib_compress_bound(data.len())];
    let n = compressor
        .zlib_compress(data, &mut out)
        .map_err(|e| format!("deflate: {e}"))?;
    out.truncate(n);
    out.shrink_to_fit(); // as above: a compressible chunk would hold its raw size
    Ok(out)
}

/// The largest zstd context a worker keeps between chunks (levels 3-5 over 1 MiB chunks: 1-2 MiB).
const MAX_KEPT_ZSTD_CONTEXT: usize = 16 << 20;

/// A zstd frame with its content checksum (a reader verifies it: a damaged chunk does not decode
/// silently, as zlib's Adler-32 guarantees for deflate). Each worker thread keeps its compressor:
/// a new one per chunk allocated (and faulted in) its megabytes of tables every time. The pools
/// live as long as the process: a big one is let go.
fn compress_zstd(data: &[u8], level: i32) -> Result<Vec<u8>> {
    thread_local! {
        static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    }
    COMPRESSOR.with_borrow_mut(|kept| {
        if kept.as_ref().is_none_or(|(l, _)| *l != level) {
            let mut compressor = zstd::bulk::Compressor::new(level).map_err(|e| format!("zstd: {e}"))?;
            compressor
                .set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
                .map_err(|e| format!("zstd: {e}"))?;
            *kept = Some((level, compressor));
        }
        let (_, compressor) = kept.as_mut().expect("made above");
        let mut out = compressor.compress(data).map_err(|e| format!("zstd: {e}"))?;
        out.shrink_to_fit(); // held until HDF5 stores it: no slack beside it
        if compressor.context_mut().sizeof() > MAX_KEPT_ZSTD_CONTEXT {
            *kept = None; // high levels over big chunks: hundreds of MiB per worker, not kept idle
        }
        Ok(out)
    })
}

/// Inflates a zlib stream that must give exactly `len` bytes (more is refused, never allocated).
fn inflate(data: &[u8], len: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    let n = inflate_into(data, &mut out)?;
    out.truncate(n);
    Ok(out)
}

/// Inflates into `out`; returns how many bytes the stream held (more than fit is an error).
fn inflate_into(data: &[u8], out: &mut [u8]) -> Result<usize> {
    libdeflater::Decompressor::new()
        .zlib_decompress(data, out)
        .map_err(|e| format!("a deflated chunk does not inflate ({e:?})"))
}

fn unzstd(data: &[u8], len: usize) -> Result<Vec<u8>> {
    zstd::bulk::decompress(data, len).map_err(|e| format!("a zstd chunk does not decompress ({e})"))
}

/// Decompresses into `out`; returns how many bytes the frame held (more than fit is an error).
fn unzstd_into(data: &[u8], out: &mut [u8]) -> Result<usize> {
    zstd::bulk::decompress_to_buffer(data, out).map_err(|e| format!("a zstd chunk does not decompress ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fletcher32_matches_hdf5_reference_values() {
        // H5_checksum_fletcher32 by hand: words 0x0102, 0x0304 -> sum1 0x0406, sum2 0x0508.
        assert_eq!(fletcher32(&[1, 2, 3, 4]), 0x0508_0406);
        // Odd length: the last byte counts as the high byte of a word.
        assert_eq!(fletcher32(&[1, 2, 3]), 0x0504_0402);
        assert_eq!(fletcher32(&[]), 0);
    }

    #[test]
    fn pipelines_round_trip_and_refuse_damage() {
        let raw: Vec<u8> = (0..100_000u32).flat_map(|i| (i % 977).to_le_bytes()).collect();
        for codec in [DEFLATE, ZSTD] {
            let pipeline = Pipeline {
                filters: vec![SHUFFLE, codec, FLETCHER32],
                level: 1,
                itemsize: 4,
            };
            let mut stored = pipeline.encode(&raw).unwrap();
            assert!(stored.len() < raw.len() / 4);
            assert_eq!(pipeline.decode(stored.clone(), 0, raw.len()).unwrap(), raw);
            stored[10] ^= 1;
            assert!(pipeline.decode(stored, 0, raw.len()).is_err());
            // Without the checksum, damage is still caught by the codec or the size check.
            let bare = Pipeline {
                filters: vec![SHUFFLE, codec],
                level: 1,
                itemsize: 4,
            };
            let mut stored = bare.encode(&raw).unwrap();
            stored.truncate(stored.len() / 2);
            assert!(bare.decode(stored, 0, raw.len()).is_err());
        }
    }

    #[test]
    fn a_stored_chunk_holds_no_more_memory_than_its_bytes() {
        // Held until HDF5 stores it: a chunk of zeros stored in ~1 KiB kept its 1 MiB buffer
        // at the deflate levels libdeflate runs (0, 4-9), and Fletcher-32 doubled a shrunk one.
        let zeros = vec![0u8; 1 << 20];
        for (codec, levels) in [(DEFLATE, 0..=9), (ZSTD, 1..=9)] {
            for level in levels {
                for checksum in [false, true] {
                    let mut filters = vec![SHUFFLE, codec];
                    filters.extend(checksum.then_some(FLETCHER32));
                    let pipeline = Pipeline {
                        filters,
                        level,
                        itemsize: 4,
                    };
                    let stored = pipeline.encode(&zeros).unwrap();
                    assert!(
                        stored.capacity() <= stored.len() + 64,
                        "codec {codec} level {level} checksum {checksum}: {} bytes in {}",
                        stored.len(),
                        stored.capacity()
                    );
                }
            }
        }
    }

    #[test]
    fn a_kept_zstd_compressor_makes_the_frames_a_fresh_one_makes() {
        let raw: Vec<u8> = (0..50_000u32).flat_map(|i| (i % 613).to_le_bytes()).collect();
        let fresh = |level| {
            let mut c = zstd::bulk::Compressor::new(level).unwrap();
            c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
                .unwrap();
            c.compress(&raw).unwrap()
        };
        // Levels alternate on one thread: each call after the first reuses or replaces the kept one.
        for level in [3, 3, 1, 19, 3] {
            let kept = compress_zstd(&raw, level).unwrap();
            assert_eq!(kept, fresh(level), "level {level}");
            assert_eq!(zstd::bulk::decompress(&kept, raw.len()).unwrap(), raw);
        }
    }

    #[test]
    fn every_deflate_level_makes_a_zlib_stream_another_inflater_reads() {
        use std::io::Read;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let random: Vec<u8> = (0..300_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let weights: Vec<u8> = random.chunks(4).flat_map(|c| [c[0], c[1], 0x3c, 0xbd]).collect();
        for data in [Vec::new(), vec![5u8; 1], random, weights] {
            for level in 0..=9 {
                let stored = deflate(&data, level).unwrap();
                let mut back = Vec::new();
                flate2::read::ZlibDecoder::new(&stored[..])
                    .read_to_end(&mut back)
                    .unwrap();
                assert_eq!(back, data, "level {level}, {} bytes", data.len());
                assert_eq!(inflate(&stored, data.len()).unwrap(), data);
            }
        }
    }

    #[test]
    fn a_skipped_filter_is_not_undone() {
        let raw = vec![7u8; 64];
        let pipeline = Pipeline {
            filters: vec![SHUFFLE, DEFLATE],
            level: 1,
            itemsize: 4,
        };
        // libhdf5 stores a chunk unfiltered when a filter fails on it and marks the filter skipped.
        assert_eq!(pipeline.decode(shuffle(&raw, 4), 0b10, 64).unwrap(), raw);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// A stored chunk of any bytes, through any of our pipelines and masks, into a buffer of
        /// any length: decoded exactly or refused, never a panic; a well-formed one flipped in a
        /// byte is never taken for other data under Fletcher-32.
        #[test]
        fn any_stored_bytes_decode_or_are_refused(
            stored in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
            codec in proptest::sample::select(vec![DEFLATE, ZSTD]),
            itemsize in 0usize..10,
            skipped in proptest::prelude::any::<u32>(),
            len in 0usize..8192,
            flip in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let pipeline = Pipeline { filters: vec![SHUFFLE, codec, FLETCHER32], level: 1, itemsize };
            let mut out = vec![0u8; len];
            let _ = pipeline.decode_into(stored.clone(), skipped, &mut out);
            let _ = pipeline.decode(stored, skipped, len);
            let mut encoded = pipeline.encode(&raw).unwrap();
            let mut back = vec![0u8; raw.len()];
            pipeline.decode_into(encoded.clone(), 0, &mut back).unwrap();
            proptest::prop_assert_eq!(&back, &raw);
            let at = flip.index(encoded.len());
            encoded[at] ^= 0x5a;
            proptest::prop_assert!(pipeline.decode_into(encoded, 0, &mut back).is_err());
        }
    }
}
