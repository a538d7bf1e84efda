//! Positioned, parallel reads and writes of tensor bytes, each checksummed on the way (CRC-32 for
//! zip members, CRC32C for the tensor bundle). Every container (a zip member, an HDF5 file, the
//! tensor bundle) moves its tensors through here: the caller plans where each tensor goes, this
//! module moves the bytes.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crc32fast::Hasher;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Bytes per unit of parallel work: small enough that the CRC pass leaves the chunk in L2 for the copy.
pub const CHUNK: usize = 1 << 20;

/// A stretch of a file whose CRC-32 is already known (because its bytes went through this module).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownCrc {
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
}

/// Tensor bytes written or read by this module in the process so far, for progress bars: one
/// relaxed add per chunk of up to [`CHUNK`] bytes.
static TENSOR_BYTES_MOVED: AtomicU64 = AtomicU64::new(0);

/// See [`TENSOR_BYTES_MOVED`].
pub fn tensor_bytes_moved() -> u64 {
    TENSOR_BYTES_MOVED.load(Ordering::Relaxed)
}

/// Counts `n` tensor bytes as moved (chunked HDF5 reads and writes count theirs too).
pub fn count_moved(n: usize) {
    TENSOR_BYTES_MOVED.fetch_add(n as u64, Ordering::Relaxed);
}

/// The most I/O threads a call may ask for: past a few per core they only cost memory and startup.
pub const MAX_THREADS: usize = 256;

/// One pool per thread count, kept for the life of the process: a save makes several parallel
/// calls, and starting a pool for each would cost more than small saves take.
fn pool_for(threads: usize) -> Result<Arc<rayon::ThreadPool>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    if threads > MAX_THREADS {
        return Err(Error::Argument(format!(
            "`threads` must be at most {MAX_THREADS}. Received: threads={threads}"
        )));
    }
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(pool) = pools.get(&threads) {
        return Ok(pool.clone());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("kerassave-io-{i}"))
        .stack_size(8 << 20) // headroom: C codecs keep their state on the stack (ISA-L's ~240 KiB)
        .build()
        .map_err(|e| Error::Argument(format!("cannot start {threads} I/O threads: {e}")))?;
    let pool = Arc::new(pool);
    pools.insert(threads, pool.clone());
    Ok(pool)
}

/// Runs `f` on a pool of `threads` workers (0 = one per core). One thread is a pool of one too:
/// run inline, `f`'s parallel iterators would spread over rayon's global pool, one per core.
pub fn run_on_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> Result<T> {
    Ok(pool_for(threads)?.install(f))
}

fn end_of(path: &Path, offset: u64, len: usize) -> Result<u64> {
    offset.checked_add(len as u64).ok_or_else(|| {
        Error::Argument(format!(
            "{}: tensor at offset {offset} of {len} bytes overflows",
            path.display()
        ))
    })
}

fn read_error(path: &Path, offset: u64, len: usize, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Error::format(
            path,
            format!("file is truncated: {len} bytes expected at offset {offset}"),
        )
    } else {
        Error::io(path, "read", e)
    }
}

/// Splits every tensor into `CHUNK`-sized jobs: (tensor index, file offset, bytes).
fn chunk_jobs<B, C>(tensors: impl IntoIterator<Item = (u64, B)>, split: impl Fn(B) -> Vec<C>) -> Vec<(usize, u64, C)> {
    let mut jobs = Vec::new();
    for (index, (offset, bytes)) in tensors.into_iter().enumerate() {
        for (k, chunk) in split(bytes).into_iter().enumerate() {
            jobs.push((index, offset + (k * CHUNK) as u64, chunk));
        }
    }
    jobs
}

/// A checksum that can be computed over chunks in parallel and joined in order afterwards.
pub trait Checksum: Send + Sized {
    /// The checksum of nothing.
    fn empty() -> Self;
    fn update(&mut self, bytes: &[u8]);
    /// Appends `next`, the checksum of the bytes that follow those `self` covers.
    fn combine(&mut self, next: &Self);
    fn value(&self) -> u32;
}

/// CRC-32 (zlib's, zip's).
impl Checksum for Hasher {
    fn empty() -> Self {
        Hasher::new()
    }
    fn update(&mut self, bytes: &[u8]) {
        Hasher::update(self, bytes);
    }
    fn combine(&mut self, next: &Self) {
        Hasher::combine(self, next);
    }
    fn value(&self) -> u32 {
        self.clone().finalize()
    }
}

/// CRC32C (Castagnoli; TensorFlow's tensor bundle), with the length `combine` needs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Crc32c {
    crc: u32,
    len: usize,
}

impl Checksum for Crc32c {
    fn empty() -> Self {
        Crc32c::default()
    }
    fn update(&mut self, bytes: &[u8]) {
        self.crc = crate::bundle::crc32c_append(self.crc, bytes);
        self.len += bytes.len();
    }
    fn combine(&mut self, next: &Self) {
        self.crc = crate::bundle::crc32c_combine(self.crc, next.crc, next.len);
        self.len += next.len;
    }
    fn value(&self) -> u32 {
        self.crc
    }
}

/// Folds per-chunk checksums (in job order) into one per tensor.
fn combine_per_tensor<C: Checksum>(
    count: usize,
    jobs: impl IntoIterator<Item = (usize, Result<C>)>,
) -> Result<Vec<u32>> {
    let mut sums: Vec<C> = (0..count).map(|_| C::empty()).collect();
    for (index, sum) in jobs {
        sums[index].combine(&sum?);
    }
    Ok(sums.iter().map(C::value).collect())
}

/// Writes each `(offset, bytes)` at its offset and returns each tensor's CRC-32.
/// Renames each `(from, to)` in order, stopping at the first that fails; returns how many were
/// renamed. One call for files that make one whole: nothing of the caller's runs between them.
pub fn rename_all(pairs: &[(PathBuf, PathBuf)]) -> usize {
    pairs
        .iter()
        .take_while(|(from, to)| std::fs::rename(from, to).is_ok())
        .count()
}

pub fn write_tensors(file: &File, path: &Path, tensors: &[(u64, &[u8])], threads: usize) -> Result<Vec<u32>> {
    write_tensors_with::<Hasher>(file, path, tensors, threads)
}

/// Writes each `(offset, bytes)` at its offset and returns each tensor's checksum of kind `C`,
/// computed chunk by chunk just before the chunk is written (never in a second pass).
pub fn write_tensors_with<C: Checksum>(
    file: &File,
    path: &Path,
    tensors: &[(u64, &[u8])],
    threads: usize,
) -> Result<Vec<u32>> {
    for (offset, bytes) in tensors {
        end_of(path, *offset, bytes.len())?;
    }
    let jobs = chunk_jobs(tensors.iter().copied(), |b: &[u8]| b.chunks(CHUNK).collect());
    let results: Vec<Result<C>> = run_on_pool(threads, || {
        jobs.par_iter()
            .map(|(_, offset, chunk)| {
                let mut sum = C::empty();
                sum.update(chunk);
                file.write_all_at(chunk, *offset)
                    .map_err(|e| Error::io(path, "write", e))?;
                count_moved(chunk.len());
                Ok(sum)
            })
            .collect()
    })?;
    combine_per_tensor(tensors.len(), jobs.iter().map(|j| j.0).zip(results))
}

/// Fills each `(offset, buffer)` from the file and returns each tensor's CRC-32.
/// The buffers must not overlap (the caller checks); a short file is a format error.
pub fn read_tensors(file: &File, path: &Path, tensors: &mut [(u64, &mut [u8])], threads: usize) -> Result<Vec<u32>> {
    read_tensors_with::<Hasher>(file, path, tensors, threads)
}

/// As [`read_tensors`], with each tensor's checksum of kind `C`.
pub fn read_tensors_with<C: Checksum>(
    file: &File,
    path: &Path,
    tensors: &mut [(u64, &mut [u8])],
    threads: usize,
) -> Result<Vec<u32>> {
    for (offset, bytes) in tensors.iter() {
        end_of(path, *offset, bytes.len())?;
    }
    let count = tensors.len();
    let mut jobs = chunk_jobs(tensors.iter_mut().map(|(o, b)| (*o, &mut **b)), |b: &mut [u8]| {
        b.chunks_mut(CHUNK).collect()
    });
    let results: Vec<Result<C>> = run_on_pool(threads, || {
        jobs.par_iter_mut()
            .map(|(_, offset, chunk)| {
                file.read_exact_at(chunk, *offset)
                    .map_err(|e| read_error(path, *offset, chunk.len(), e))?;
                count_moved(chunk.len());
                let mut sum = C::empty();
                sum.update(chunk);
                Ok(sum)
            })
            .collect()
    })?;
    combine_per_tensor(count, jobs.iter().map(|j| j.0).zip(results))
}

/// CRC-32 of `len` bytes of the file from `start`. Stretches listed in `known` (sorted, disjoint,
/// inside the range) are not read again: their CRCs are joined with those of the bytes between them.
pub fn crc32_of_range(
    file: &File,
    path: &Path,
    start: u64,
    len: u64,
    known: &[KnownCrc],
    threads: usize,
) -> Result<u32> {
    let end = start
        .checked_add(len)
        .ok_or_else(|| Error::Argument(format!("{}: range at {start} of {len} bytes overflows", path.display())))?;
    // Pieces in file order: Ok(known hasher) or Err((gap offset, gap length)).
    let mut pieces: Vec<std::result::Result<Hasher, (u64, u64)>> = Vec::new();
    let mut cursor = start;
    for k in known {
        let k_end = k
            .offset
            .checked_add(k.len)
            .filter(|&e| k.offset >= cursor && e <= end)
            .ok_or_else(|| {
                Error::Argument(format!(
                    "{}: known stretch {k:?} is unsorted, overlapping or outside {start}..{end}",
                    path.display()
                ))
            })?;
        if k.offset > cursor {
            pieces.push(Err((cursor, k.offset - cursor)));
        }
        pieces.push(Ok(Hasher::new_with_initial_len(k.crc, k.len)));
        cursor = k_end;
    }
    if end > cursor {
        pieces.push(Err((cursor, end - cursor)));
    }

    // Gaps are read back in chunks, in parallel, each into a worker-local buffer.
    let mut gap_jobs: Vec<(u64, usize)> = Vec::new();
    for piece in &pieces {
        if let Err((offset, gap_len)) = *piece {
            let mut at = offset;
            while at < offset + gap_len {
                let n = (offset + gap_len - at).min(CHUNK as u64) as usize;
                gap_jobs.push((at, n));
                at += n as u64;
            }
        }
    }
    let gap_hashers: Vec<Result<Hasher>> = run_on_pool(threads, || {
        gap_jobs
            .par_iter()
            .map_init(
                || vec![0u8; CHUNK],
                |buf, &(offset, n)| {
                    file.read_exact_at(&mut buf[..n], offset)
                        .map_err(|e| read_error(path, offset, n, e))?;
                    let mut hasher = Hasher::new();
                    hasher.update(&buf[..n]);
                    Ok(hasher)
                },
            )
            .collect()
    })?;

    let mut total = Hasher::new();
    let mut gaps = gap_hashers.into_iter();
    for piece in pieces {
        match piece {
            Ok(hasher) => total.combine(&hasher),
            Err((offset, gap_len)) => {
                let mut at = offset;
                while at < offset + gap_len {
                    let hasher = gaps.next().expect("one gap job per chunk of every gap")?;
                    total.combine(&hasher);
                    at += (offset + gap_len - at).min(CHUNK as u64);
                }
            }
        }
    }
    Ok(total.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn open_rw(path: &Path) -> File {
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn rename_all_renames_in_order_up_to_the_first_failure() {
        let dir = std::env::temp_dir().join(format!("ksf-rename-all-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b, c) = (dir.join("a"), dir.join("b"), dir.join("c"));
        std::fs::write(&a, b"1").unwrap();
        std::fs::write(&b, b"2").unwrap();
        let pairs = [
            (a.clone(), dir.join("x")),
            (c.clone(), dir.join("y")), // missing: stops here
            (b.clone(), dir.join("z")),
        ];
        assert_eq!(rename_all(&pairs), 1);
        assert!(dir.join("x").exists() && !a.exists() && b.exists() && !dir.join("z").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_then_read_round_trips_with_matching_crcs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        let file = open_rw(&path);
        let a = pattern(3 * CHUNK + 17, 1);
        let b = pattern(5, 2);
        let empty: Vec<u8> = Vec::new();
        let tensors = [(100u64, &a[..]), (100 + a.len() as u64 + 3, &b[..]), (7, &empty[..])];
        let crcs = write_tensors(&file, Path::new("t.bin"), &tensors, 2).unwrap();
        assert_eq!(crcs, vec![crc32fast::hash(&a), crc32fast::hash(&b), 0]);

        let mut ra = vec![0u8; a.len()];
        let mut rb = vec![0u8; b.len()];
        let mut targets = [(100u64, &mut ra[..]), (100 + a.len() as u64 + 3, &mut rb[..])];
        let read_crcs = read_tensors(&file, Path::new("t.bin"), &mut targets, 2).unwrap();
        assert_eq!(read_crcs[..], crcs[..2]);
        assert_eq!(ra, a);
        assert_eq!(rb, b);
    }

    #[test]
    fn crc32c_variant_matches_whole_buffer_crc32c() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.bin");
        let file = open_rw(&path);
        let a = pattern(2 * CHUNK + 5, 3);
        let b = pattern(7, 4);
        let tensors = [(0u64, &a[..]), (a.len() as u64, &b[..])];
        let crcs = write_tensors_with::<Crc32c>(&file, Path::new("c.bin"), &tensors, 2).unwrap();
        assert_eq!(crcs, vec![crate::bundle::crc32c(&a), crate::bundle::crc32c(&b)]);
        let mut ra = vec![0u8; a.len()];
        let read = read_tensors_with::<Crc32c>(&file, Path::new("c.bin"), &mut [(0, &mut ra[..])], 2).unwrap();
        assert_eq!(read[0], crcs[0]);
        assert_eq!(ra, a);
    }

    #[test]
    fn reading_past_the_end_is_a_truncation_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.bin");
        std::fs::write(&path, [1u8; 10]).unwrap();
        let file = File::open(&path).unwrap();
        let mut buf = [0u8; 20];
        let err = read_tensors(&file, Path::new("short.bin"), &mut [(0, &mut buf[..])], 1).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err}");
        assert!(err.to_string().contains("truncated"));
    }

    #[test]
    fn bad_known_stretches_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.bin");
        std::fs::write(&path, pattern(100, 0)).unwrap();
        let file = File::open(&path).unwrap();
        let overlapping = [
            KnownCrc {
                offset: 10,
                len: 20,
                crc: 0,
            },
            KnownCrc {
                offset: 15,
                len: 5,
                crc: 0,
            },
        ];
        assert!(crc32_of_range(&file, Path::new("k"), 0, 100, &overlapping, 1).is_err());
        let outside = [KnownCrc {
            offset: 90,
            len: 20,
            crc: 0,
        }];
        assert!(crc32_of_range(&file, Path::new("k"), 0, 100, &outside, 1).is_err());
        assert!(crc32_of_range(&file, Path::new("k"), u64::MAX, 2, &[], 1).is_err());
    }

    #[test]
    fn thread_counts_are_bounded_and_pools_reused() {
        assert!(matches!(run_on_pool(MAX_THREADS + 1, || ()), Err(Error::Argument(_))));
        let a = pool_for(2).unwrap();
        let b = pool_for(2).unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "a second call with the same thread count made a new pool"
        );
        assert_eq!(run_on_pool(3, rayon::current_num_threads).unwrap(), 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Joining known CRCs with read-back gaps gives the CRC of the whole range.
        #[test]
        fn crc_of_range_matches_direct_hash(
            len in 1usize..(3 * CHUNK),
            cuts in proptest::collection::vec(0usize..(3 * CHUNK), 0..8),
            start in 0usize..64,
            threads in 1usize..3,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("r.bin");
            let data = pattern(start + len, 9);
            std::fs::write(&path, &data).unwrap();
            let file = File::open(&path).unwrap();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % len).collect();
            cuts.sort_unstable();
            cuts.dedup();
            // Every other stretch between cuts is "known".
            let mut known = Vec::new();
            for (i, w) in cuts.windows(2).enumerate() {
                if i % 2 == 0 {
                    let (a, b) = (start + w[0], start + w[1]);
                    known.push(KnownCrc { offset: a as u64, len: (b - a) as u64, crc: crc32fast::hash(&data[a..b]) });
                }
            }
            let got = crc32_of_range(&file, Path::new("r"), start as u64, len as u64, &known, threads).unwrap();
            prop_assert_eq!(got, crc32fast::hash(&data[start..]));
        }
    }
}
