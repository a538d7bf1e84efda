//! HDF5's byte shuffle filter (H5Zshuffle.c): byte k of every element, then byte k+1 of every
//! element, ...; a tail shorter than an element stays where it is. Elements of 2, 4 and 8 bytes
//! (bf16/f16, f32, f64) move 16 at a time through SSE2 registers on x86-64, the rest byte by byte.

/// The chunk `data` shuffled (planes of equal bytes), as HDF5 stores it.
pub fn shuffle(data: &[u8], itemsize: usize) -> Vec<u8> {
    regroup(data, itemsize, true)
}

/// The inverse of `shuffle`.
pub fn unshuffle(data: &[u8], itemsize: usize) -> Vec<u8> {
    regroup(data, itemsize, false)
}

/// `unshuffle` into `out`, of `data`'s length.
pub fn unshuffle_into(data: &[u8], itemsize: usize, out: &mut [u8]) {
    regroup_into(data, itemsize, false, out)
}

fn regroup(data: &[u8], itemsize: usize, to_planes: bool) -> Vec<u8> {
    let mut out = vec![0u8; data.len()]; // every byte is written below: no copy to start from
    regroup_into(data, itemsize, to_planes, &mut out);
    out
}

fn regroup_into(data: &[u8], itemsize: usize, to_planes: bool, out: &mut [u8]) {
    assert_eq!(data.len(), out.len(), "a shuffle's output is its input's length");
    let body = data.len() - data.len() % itemsize.max(1);
    if itemsize <= 1 || body == 0 {
        out.copy_from_slice(data);
        return;
    }
    out[body..].copy_from_slice(&data[body..]);
    let (src, dst) = (&data[..body], &mut out[..body]);
    let done = simd::regroup(src, dst, itemsize, to_planes);
    match itemsize {
        2 => move_bytes::<2>(src, dst, 2, to_planes, done),
        4 => move_bytes::<4>(src, dst, 4, to_planes, done),
        8 => move_bytes::<8>(src, dst, 8, to_planes, done),
        n => move_bytes::<0>(src, dst, n, to_planes, done),
    }
}

/// Byte k of element j sits at `j * n + k` in element order and at `k * count + j` in plane
/// order; this moves every byte of the elements from `first` on from one order to the other, a
/// plane at a time. `N` is `n` when known at compile time (the loops then unroll), 0 otherwise.
fn move_bytes<const N: usize>(src: &[u8], dst: &mut [u8], n: usize, to_planes: bool, first: usize) {
    let n = if N == 0 { n } else { N };
    let count = src.len() / n;
    for k in 0..n {
        let plane = k * count + first..(k + 1) * count;
        if to_planes {
            for (o, e) in dst[plane].iter_mut().zip(src[first * n..].chunks_exact(n)) {
                *o = e[k];
            }
        } else {
            for (e, &b) in dst[first * n..].chunks_exact_mut(n).zip(&src[plane]) {
                e[k] = b;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    //! 16 elements of n bytes fill n registers. Index a byte of them by the bits of its register
    //! (which of the n) and of its position (0-15). `interleave` on register bit s gives that bit
    //! the position's top bit and appends the old register bit below the position's others: a
    //! rotation. Element order has j (element, 4 bits) and k (byte, log2 n bits) as (j, k) across
    //! (register, position); plane order has (k, j). The rounds below rotate one into the other.
    use std::arch::x86_64::{
        __m128i, _mm_loadu_si128, _mm_setzero_si128, _mm_storeu_si128, _mm_unpackhi_epi8, _mm_unpacklo_epi8,
    };

    /// Moves the elements of whole blocks of 16; returns how many elements it moved.
    pub fn regroup(src: &[u8], dst: &mut [u8], itemsize: usize, to_planes: bool) -> usize {
        match (itemsize, to_planes) {
            (2, true) => blocks::<2>(src, dst, true, &[0, 0, 0, 0], [0, 1]),
            (2, false) => blocks::<2>(src, dst, false, &[0], [0, 1]),
            (4, true) => blocks::<4>(src, dst, true, &[1, 0, 1, 0], [0, 1, 2, 3]),
            (4, false) => blocks::<4>(src, dst, false, &[1, 0], [0, 1, 2, 3]),
            // Four rounds can only leave the byte index's bits permuted across the 8 registers.
            (8, true) => blocks::<8>(src, dst, true, &[2, 1, 0, 2], [0, 2, 4, 6, 1, 3, 5, 7]),
            (8, false) => blocks::<8>(src, dst, false, &[2, 1, 0], [0, 1, 2, 3, 4, 5, 6, 7]),
            _ => 0,
        }
    }

    /// `rounds` of `interleave` over each block of 16 elements of `N` bytes; in plane order,
    /// register r holds plane `plane[r]` (element order: the block's r-th 16 bytes).
    fn blocks<const N: usize>(
        src: &[u8],
        dst: &mut [u8],
        to_planes: bool,
        rounds: &[usize],
        plane: [usize; N],
    ) -> usize {
        let count = src.len() / N;
        assert!(src.len() == count * N && dst.len() == src.len());
        let plane_at = |r: usize, block: usize| plane[r] * count + block * 16; // within `count * N`
        for block in 0..count / 16 {
            let element_at = |r: usize| block * 16 * N + r * 16;
            // SAFETY: register-only SSE2 operation.
            let mut regs = [unsafe { _mm_setzero_si128() }; N];
            for (r, reg) in regs.iter_mut().enumerate() {
                let at = if to_planes { element_at(r) } else { plane_at(r, block) };
                // SAFETY: `at + 16 <= count * N == src.len()` (see `plane_at`, `element_at`); SSE2 is x86-64's baseline.
                *reg = unsafe { _mm_loadu_si128(src[at..at + 16].as_ptr().cast()) };
            }
            for &bit in rounds {
                interleave(&mut regs, bit);
            }
            for (r, reg) in regs.iter().enumerate() {
                let at = if to_planes { plane_at(r, block) } else { element_at(r) };
                // SAFETY: as for the loads, in `dst` of the same length.
                unsafe { _mm_storeu_si128(dst[at..at + 16].as_mut_ptr().cast(), *reg) };
            }
        }
        count / 16 * 16
    }

    /// Interleaves the bytes of each pair of registers whose indices differ in bit `bit`.
    #[inline(always)]
    fn interleave<const N: usize>(regs: &mut [__m128i; N], bit: usize) {
        let mask = 1 << bit;
        for i in (0..N).filter(|i| i & mask == 0) {
            let (a, b) = (regs[i], regs[i | mask]);
            // SAFETY: register-only SSE2 operations.
            unsafe {
                regs[i] = _mm_unpacklo_epi8(a, b);
                regs[i | mask] = _mm_unpackhi_epi8(a, b);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    /// No vector kernel here: every element goes byte by byte.
    pub fn regroup(_: &[u8], _: &mut [u8], _: usize, _: bool) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The filter's definition, one byte at a time.
    fn shuffled_by_definition(data: &[u8], itemsize: usize) -> Vec<u8> {
        let n = data.len() / itemsize;
        let mut expected = data.to_vec();
        for j in 0..n {
            for k in 0..itemsize {
                expected[k * n + j] = data[j * itemsize + k];
            }
        }
        expected
    }

    #[test]
    fn shuffle_round_trips_with_a_tail() {
        let data: Vec<u8> = (0..=22).collect();
        let shuffled = shuffle(&data, 4);
        assert_eq!(&shuffled[..5], &[0, 4, 8, 12, 16]);
        assert_eq!(&shuffled[20..], &[20, 21, 22]);
        assert_eq!(unshuffle(&shuffled, 4), data);
    }

    #[test]
    fn every_element_size_and_length_matches_the_definition() {
        // Lengths around the 16-element blocks of the vector kernels, tails included.
        for itemsize in 1..=12 {
            for (len, partial) in [0, 1, 15, 16, 17, 31, 32, 33, 127, 128, 129, 1000, 4099]
                .into_iter()
                .flat_map(|len| [(len, 0), (len, itemsize / 2)])
            {
                let data: Vec<u8> = (0..(len * itemsize + partial) as u32)
                    .map(|i| (i * 7 % 251) as u8)
                    .collect();
                let data = &data[..];
                let expected = shuffled_by_definition(data, itemsize);
                assert_eq!(
                    shuffle(data, itemsize),
                    expected,
                    "itemsize {itemsize}, {} bytes",
                    data.len()
                );
                assert_eq!(
                    unshuffle(&expected, itemsize),
                    data,
                    "itemsize {itemsize}, {} bytes",
                    data.len()
                );
            }
        }
    }
}
