//! Reading chunked (compressed) datasets: every chunk of every dataset read by offset,
//! decoded and placed into its dataset's final buffer on all cores.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;

use super::filters::Pipeline;
use super::reader::{chunks_in_proportion, max_stored_chunk, Chunked};
use crate::error::{Error, Result};
use crate::io::run_on_pool;

/// One chunked dataset to read: its chunks (from the listing), shape and element size, and
/// the C-ordered buffer of exactly its bytes that receives it.
pub struct ChunkedRead<'a> {
    pub name: &'a str,
    pub chunked: &'a Chunked,
    pub shape: &'a [u64],
    pub itemsize: usize,
    pub out: &'a mut [u8],
}

/// A stored chunk as read: (offset in the HDF5 file, stored bytes, CRC-32 of them), so that a
/// zip member's CRC can count them without reading them again.
pub type ReadChunk = (u64, u64, u32);

/// Where stored chunks are read from: a file, by offset, or an HDF5 file already in memory (a
/// zip member that was compressed, inflated).
pub trait StoredBytes: Sync {
    /// Fills `buf` from `offset`; an `UnexpectedEof` error when the source ends before.
    fn read_stored(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl StoredBytes for File {
    fn read_stored(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

impl StoredBytes for [u8] {
    fn read_stored(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let stored = usize::try_from(offset)
            .ok()
            .and_then(|at| self.get(at..at.checked_add(buf.len())?))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(stored);
        Ok(())
    }
}

/// Reads the datasets' chunks from `source` (the HDF5 file starting at `start`), in parallel;
/// returns each chunk's stored extent and CRC-32, in no particular order.
/// Refuses, naming `path` and the dataset, chunks that do not tile the shape or do not decode.
pub fn read_chunked<S: StoredBytes + ?Sized>(
    source: &S,
    path: &Path,
    start: u64,
    datasets: Vec<ChunkedRead<'_>>,
    threads: usize,
) -> Result<Vec<ReadChunk>> {
    let mut tasks = Vec::new();
    for (i, d) in datasets.iter().enumerate() {
        check_tiling(d).map_err(|msg| Error::format(path, format!("dataset '{}': {msg}", d.name)))?;
        tasks.extend((0..d.chunked.chunks.len()).map(|k| (i, k)));
    }
    // Each chunk writes its own stretch of its dataset's buffer (`check_tiling` proved them
    // disjoint): the buffers become raw pointers shared by the tasks.
    let datasets: Vec<(ChunkedRead<'_>, usize, usize)> = datasets
        .into_iter()
        .map(|mut d| {
            let (ptr, len) = (d.out.as_mut_ptr() as usize, d.out.len());
            d.out = &mut [];
            (d, ptr, len)
        })
        .collect();
    let datasets = &datasets;
    run_on_pool(threads, || {
        tasks
            .par_iter()
            .map(|&(i, k)| {
                let (d, ptr, len) = &datasets[i];
                let (ptr, len) = (*ptr, *len);
                let chunk = &d.chunked.chunks[k];
                let fail = |msg: String| {
                    Error::format(
                        path,
                        format!("dataset '{}', chunk at {:?}: {msg}", d.name, chunk.coords),
                    )
                };
                let mut stored = vec![0u8; chunk.size as usize];
                let at = start
                    .checked_add(chunk.offset)
                    .ok_or_else(|| fail("offset overflows".into()))?;
                source.read_stored(&mut stored, at).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        fail("the file ends before the chunk (truncated?)".into())
                    } else {
                        Error::io(path, "read", e)
                    }
                })?;
                let read = (chunk.offset, chunk.size, crc32fast::hash(&stored));
                let pipeline = Pipeline {
                    filters: d.chunked.filters.clone(),
                    level: 0,
                    itemsize: d.itemsize,
                };
                let raw_len = chunk_len(&d.chunked.chunk_shape, d.itemsize);
                // SAFETY: the buffer outlives this call (the caller holds it), and the bytes this chunk
                // writes are written by no other task (`check_tiling`).
                let out = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
                match stretch_of(&chunk.coords, &d.chunked.chunk_shape, d.shape, d.itemsize) {
                    Some(at) => pipeline.decode_into(stored, chunk.skipped, &mut out[at..at + raw_len]),
                    None => pipeline
                        .decode(stored, chunk.skipped, raw_len)
                        .map(|raw| place(&raw, &chunk.coords, &d.chunked.chunk_shape, d.shape, d.itemsize, out)),
                }
                .map_err(fail)?;
                crate::io::count_moved(raw_len);
                Ok(read)
            })
            .collect()
    })?
}

fn chunk_len(chunk_shape: &[u64], itemsize: usize) -> usize {
    chunk_shape.iter().product::<u64>() as usize * itemsize
}

/// Every chunk starts on a multiple of the chunk shape inside the dataset, none twice, all
/// present, and the buffer holds exactly the dataset: chunks then fill disjoint stretches.
fn check_tiling(d: &ChunkedRead<'_>) -> std::result::Result<(), String> {
    let c = &d.chunked.chunk_shape;
    let elements = d.shape.iter().try_fold(1u64, |n, &x| n.checked_mul(x));
    if elements.and_then(|n| n.checked_mul(d.itemsize as u64)) != Some(d.out.len() as u64) {
        return Err("the buffer does not match the dataset's shape".into());
    }
    if c.len() != d.shape.len()
        || c.contains(&0)
        || c.iter()
            .try_fold(d.itemsize as u64, |n, &x| n.checked_mul(x))
            .is_none_or(|n| n > 1 << 32 || !chunks_in_proportion(n, d.out.len() as u64))
    {
        return Err(format!("chunk shape {c:?} does not fit shape {:?}", d.shape));
    }
    let expected = d.shape.iter().zip(c).map(|(&s, &c)| s.div_ceil(c)).product::<u64>();
    let mut seen = HashSet::new();
    for chunk in &d.chunked.chunks {
        let fits = chunk.coords.len() == c.len()
            && chunk
                .coords
                .iter()
                .zip(d.shape)
                .zip(c)
                .all(|((&o, &s), &c)| o < s && o % c == 0);
        if chunk.size > max_stored_chunk(chunk_len(c, d.itemsize) as u64) {
            return Err(format!(
                "a chunk at {:?} stores {} bytes, more than its elements could need",
                chunk.coords, chunk.size
            ));
        }
        if !fits || !seen.insert(&chunk.coords) {
            return Err(format!(
                "a chunk at {:?} does not tile shape {:?}",
                chunk.coords, d.shape
            ));
        }
    }
    if seen.len() as u64 != expected {
        return Err(format!("{} of its {expected} chunks are stored", seen.len()));
    }
    Ok(())
}

/// Where a chunk's raw bytes go in the dataset's buffer when they are one stretch of it (whole
/// rows of the first axis, all inside the dataset: Keras' chunks but the last), so they are
/// decoded straight there; None otherwise.
fn stretch_of(coords: &[u64], chunk_shape: &[u64], shape: &[u64], itemsize: usize) -> Option<usize> {
    let (first, rows) = (*coords.first()?, *chunk_shape.first()?);
    let whole_rows = chunk_shape[1..] == shape[1..] && first + rows <= *shape.first()?;
    let row: u64 = shape[1..].iter().product::<u64>() * itemsize as u64;
    whole_rows.then(|| (first * row) as usize)
}

/// Copies the part of a decoded chunk that lies inside the dataset to its place in `out`.
fn place(raw: &[u8], coords: &[u64], chunk_shape: &[u64], shape: &[u64], itemsize: usize, out: &mut [u8]) {
    let n = shape.len();
    let extent: Vec<usize> = (0..n)
        .map(|i| chunk_shape[i].min(shape[i] - coords[i]) as usize)
        .collect();
    let strides = |dims: &[u64]| {
        let mut s = vec![itemsize; n];
        for i in (0..n.saturating_sub(1)).rev() {
            s[i] = s[i + 1] * dims[i + 1] as usize;
        }
        s
    };
    let (from, to) = (strides(chunk_shape), strides(shape));
    let row = extent[n - 1] * itemsize;
    let mut index = vec![0usize; n - 1];
    loop {
        let src: usize = index.iter().zip(&from).map(|(i, s)| i * s).sum();
        let dst: usize = (0..n)
            .map(|i| (coords[i] as usize + index.get(i).copied().unwrap_or(0)) * to[i])
            .sum();
        out[dst..dst + row].copy_from_slice(&raw[src..src + row]);
        // The next row: count up the outer axes like an odometer.
        let mut axis = n - 1;
        loop {
            if axis == 0 {
                return;
            }
            axis -= 1;
            index[axis] += 1;
            if index[axis] < extent[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_in_memory_are_read_within_their_bounds() {
        let data: &[u8] = &[1, 2, 3, 4, 5];
        let mut buf = [0u8; 2];
        data.read_stored(&mut buf, 3).unwrap();
        assert_eq!(buf, [4, 5]);
        for offset in [4, 5, u64::MAX, u64::MAX - 1] {
            let e = data.read_stored(&mut buf, offset).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        }
    }

    #[test]
    fn place_copies_edge_chunks_of_a_3d_array() {
        // shape (3, 5, 2) of u8, chunks (2, 2, 2): 2 x 3 chunks; build it chunk by chunk.
        let shape = [3u64, 5, 2];
        let chunk_shape = [2u64, 2, 2];
        let want: Vec<u8> = (0..30).collect();
        let mut out = vec![0u8; 30];
        for a in (0..3).step_by(2) {
            for b in (0..5).step_by(2) {
                let mut raw = vec![0xEEu8; 8];
                for i in 0..2 {
                    for j in 0..2 {
                        for k in 0..2 {
                            if a + i < 3 && b + j < 5 {
                                raw[i * 4 + j * 2 + k] = want[(a + i) * 10 + (b + j) * 2 + k];
                            }
                        }
                    }
                }
                place(&raw, &[a as u64, b as u64, 0], &chunk_shape, &shape, 1, &mut out);
            }
        }
        assert_eq!(out, want);
    }
}
