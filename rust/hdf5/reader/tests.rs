//! The listing of testdata/keras_like.h5 (made by testdata/make.py with h5py), the same from a
//! file stretch and from memory, and hostile bytes: any mutation gives a listing or an error, never
//! a panic (called without the `catch_unwind` of `list_stored_datasets`, so a panic fails here).

use std::io::Write;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::*;

/// The walk alone, pages dropped (and panics not caught).
fn list(source: Source) -> std::result::Result<Vec<StoredDataset>, Failure> {
    walk_source(source, &mut Pages::new()).map(|walked| walked.found)
}

fn fixture() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("rust/hdf5/testdata/keras_like.h5");
    std::fs::read(path).unwrap()
}

fn bytes(data: &[u8]) -> Source {
    Source::Bytes(Arc::from(data))
}

#[test]
fn lists_plain_numbers_keras_bfloat16_and_untagged_opaque_only() {
    let found = list(bytes(&fixture())).unwrap();
    let listed: Vec<(&str, &[u64], &str)> = found
        .iter()
        .map(|d| (d.path.as_str(), d.shape.as_slice(), d.dtype))
        .collect();
    assert_eq!(
        listed,
        [
            ("/layers/dense/vars/0", &[3u64, 4][..], "<f4"),
            ("/layers/dense/vars/1", &[4][..], "<f4"),
            ("/layers/low/vars/0", &[6][..], "bfloat16"),
            ("/layers/low/vars/1", &[16, 16][..], "<f4"),
            ("/legacy/bf16", &[5][..], "|V2"),
            ("/optimizer/vars/0", &[][..], "<i8"),
        ]
    );
    assert!(found
        .iter()
        .all(|d| d.chunked.is_none() == (d.path != "/layers/low/vars/1")));
    // The bytes at each offset are the values make.py wrote.
    let data = fixture();
    let first = &found[0];
    let at = first.offset as usize;
    let values: Vec<f32> = data[at..at + 48]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(values, (0..12).map(|v| v as f32).collect::<Vec<_>>());
}

#[test]
fn a_gzip_dataset_is_listed_by_chunk_and_decodes_to_its_values() {
    let data = fixture();
    let found = list(bytes(&data)).unwrap();
    let low = found.iter().find(|d| d.path == "/layers/low/vars/1").unwrap();
    let chunked = low.chunked.as_ref().unwrap();
    assert_eq!(
        chunked.filters,
        [crate::hdf5::filters::SHUFFLE, crate::hdf5::filters::DEFLATE]
    );
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&data).unwrap();
    let mut out = vec![0u8; 16 * 16 * 4];
    let read = |chunked: &Chunked, out: &mut [u8]| {
        let request = crate::hdf5::chunks::ChunkedRead {
            name: &low.path,
            chunked,
            shape: &low.shape,
            itemsize: 4,
            out,
        };
        crate::hdf5::chunks::read_chunked(&file, Path::new("m.h5"), 0, vec![request], 2)
    };
    let mut chunks_read = read(chunked, &mut out).unwrap();
    assert!(out.chunks(4).all(|c| f32::from_le_bytes(c.try_into().unwrap()) == 1.0));
    // Each chunk is reported with the CRC-32 of its stored bytes, for a zip member's CRC.
    chunks_read.sort_unstable();
    let mut expected: Vec<_> = chunked
        .chunks
        .iter()
        .map(|k| {
            let stored = &data[k.offset as usize..(k.offset + k.size) as usize];
            (k.offset, k.size, crc32fast::hash(stored))
        })
        .collect();
    expected.sort_unstable();
    assert_eq!(chunks_read, expected);
    // A chunk listed twice, or one missing, is refused naming the file and the dataset.
    let mut twice = chunked.clone();
    twice.chunks.push(twice.chunks[0].clone());
    let message = read(&twice, &mut out).unwrap_err().to_string();
    assert!(message.starts_with("m.h5: dataset '/layers/low/vars/1'"), "{message}");
    // A stored size no compression of its elements could need is refused before any allocation.
    let mut lying = chunked.clone();
    lying.chunks[0].size = 1 << 40;
    let message = read(&lying, &mut out).unwrap_err().to_string();
    assert!(message.contains("more than its elements could need"), "{message}");
    // A damaged chunk does not inflate.
    let mut damaged = data.clone();
    let first = &chunked.chunks[0];
    damaged[first.offset as usize + 5] ^= 0xFF;
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&damaged).unwrap();
    let request = crate::hdf5::chunks::ChunkedRead {
        name: "x",
        chunked,
        shape: &low.shape,
        itemsize: 4,
        out: &mut out,
    };
    assert!(crate::hdf5::chunks::read_chunked(&file, Path::new("m.h5"), 0, vec![request], 1).is_err());
}

/// The fixture 1000 bytes into a file (as a member inside a zip), and the fixture's bytes.
fn fixture_in_a_file() -> (Source, Vec<u8>) {
    let data = fixture();
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&[0xAB; 1000]).unwrap();
    file.write_all(&data).unwrap();
    let source = Source::File {
        file: Arc::new(file),
        start: 1000,
        len: data.len() as u64,
    };
    (source, data)
}

#[test]
fn a_stretch_of_a_file_lists_as_the_bytes_do() {
    let (source, data) = fixture_in_a_file();
    assert_eq!(list(source).unwrap(), list(bytes(&data)).unwrap());
}

#[test]
fn the_pages_a_walk_read_are_kept_as_the_file_has_them() {
    let (source, data) = fixture_in_a_file();
    let (listing, pages) = list_keeping_pages(source, Path::new("m.h5")).unwrap();
    assert!(
        matches!(listing, Listing::Listed { ref datasets, .. } if datasets.len() == 6),
        "{listing:?}"
    );
    assert!(pages.iter().any(|&(index, _)| index == 0), "the superblock's page");
    for (index, page) in &pages {
        let at = (index * BLOCK) as usize;
        assert_eq!(
            &page[..],
            &data[at..(at + BLOCK as usize).min(data.len())],
            "page {index}"
        );
    }
    assert!(pages.windows(2).all(|w| w[0].0 < w[1].0), "in file order, each once");
    // From memory nothing is read, so nothing is kept.
    assert!(list_keeping_pages(bytes(&data), Path::new("m.h5"))
        .unwrap()
        .1
        .is_empty());
}

#[test]
fn what_cannot_be_walked_is_left_to_libhdf5() {
    let listing = list_stored_datasets(bytes(b"not an HDF5 file"), Path::new("m.h5")).unwrap();
    assert!(matches!(listing, Listing::Unreadable(_)), "{listing:?}");
}

/// The fixture with the size of the first object of its global heap collection (the root's
/// `model_config` string) grown by `by`.
fn with_heap_object_grown(by: u64) -> Vec<u8> {
    let mut data = fixture();
    let collection = data.windows(4).position(|w| w == b"GCOL").unwrap();
    let size_field = collection + 16 + 8;
    let size = u64::from_le_bytes(data[size_field..size_field + 8].try_into().unwrap());
    data[size_field..size_field + 8].copy_from_slice(&(size + by).to_le_bytes());
    data
}

#[test]
fn a_global_heap_libhdf5_would_loop_on_is_corrupt_and_named() {
    // libhdf5 then reads past the object, or loops forever where the walk lands in zeros (tests/test_hdf5_reader.py).
    for by in [64, 128, 256, 512, 1 << 40] {
        let path = PathBuf::from("weights/model.h5");
        let message = list_stored_datasets(bytes(&with_heap_object_grown(by)), &path)
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("weights/model.h5: corrupted HDF5 file: global heap collection"),
            "{message}"
        );
    }
    assert!(matches!(list(bytes(&with_heap_object_grown(0))), Ok(found) if found.len() == 6));
}

/// The fixture with the first dataset's data address (in its layout message) set to `to`.
fn with_first_address(to: u64) -> Vec<u8> {
    let mut data = fixture();
    let from = list(bytes(&data)).unwrap()[0].offset.to_le_bytes();
    let field = data.windows(8).position(|w| w == from).unwrap();
    data[field..field + 8].copy_from_slice(&to.to_le_bytes());
    data
}

#[test]
fn a_tensor_lying_over_metadata_or_another_tensor_is_corrupt() {
    let data = fixture();
    let found = list(bytes(&data)).unwrap();
    let at = |signature: &[u8]| data.windows(4).position(|w| w == signature).unwrap() as u64;
    // Each lands the 48-byte tensor on bytes the walk read as something else.
    let targets = [
        ("superblock", 0),
        ("B-tree node", at(b"TREE") + 16),
        ("local heap", at(b"HEAP")),
        ("symbol table node", at(b"SNOD") + 40),
        ("global heap", at(b"GCOL") + 8),
        ("dataset", found[1].offset - 8),
    ];
    for (what, to) in targets {
        let message = list_stored_datasets(bytes(&with_first_address(to)), Path::new("m.h5"))
            .map(|listing| format!("{listing:?}"))
            .unwrap_or_else(|e| e.to_string());
        assert!(
            message.starts_with("m.h5: corrupted HDF5 file: the bytes of dataset '/layers/dense/vars/")
                && message.contains("' overlap"),
            "{what}: {message}"
        );
    }
    assert_eq!(list(bytes(&with_first_address(found[0].offset))).unwrap(), found);
}

#[test]
fn chunks_of_one_dataset_lying_over_each_other_are_named_as_such() {
    let chunk = |offset| Chunk {
        offset,
        size: 100,
        skipped: 0,
        coords: vec![0],
    };
    let dataset = |path: &str, chunks| StoredDataset {
        path: path.to_string(),
        offset: 0,
        shape: vec![50],
        dtype: "<f4",
        nbytes: 200,
        chunked: Some(Chunked {
            chunk_shape: vec![25],
            filters: vec![1],
            chunks,
        }),
    };
    let message = |found: &[StoredDataset]| match check_disjoint(found, vec![(0, 1000)]) {
        Err(Failure::Corrupt(message)) => message,
        other => panic!("{other:?}"),
    };
    let x = dataset("/x", vec![chunk(1000), chunk(1050)]);
    assert_eq!(
        message(&[x]),
        "two chunks of dataset '/x' overlap (a damaged chunk index?)"
    );
    let (x, y) = (dataset("/x", vec![chunk(1000)]), dataset("/y", vec![chunk(1050)]));
    assert!(message(&[x, y]).contains("dataset '/y' overlap dataset '/x'"));
    let x = dataset("/x", vec![chunk(900)]);
    assert!(message(&[x]).contains("dataset '/x' overlap the file's metadata"));
}

#[test]
fn every_truncation_is_refused_or_lists_inside_the_file() {
    let data = fixture();
    for end in (0..data.len()).step_by(7) {
        if let Ok(found) = list(bytes(&data[..end])) {
            for d in found {
                assert!(d.offset <= end as u64, "{} at {} past {end}", d.path, d.offset);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn mutated_metadata_never_panics(
        edits in proptest::collection::vec((0usize..8400, any::<u8>(), 0u8..3), 1..6),
    ) {
        let mut data = fixture();
        for (at, value, kind) in edits {
            match kind {
                0 => data[at] ^= 1 << (value % 8),
                1 => data[at] = value,
                _ => {
                    let huge = u64::MAX - u64::from(value);
                    let end = (at + 8).min(data.len());
                    data[at..end].copy_from_slice(&huge.to_le_bytes()[..end - at]);
                }
            }
        }
        let _ = list(bytes(&data));
    }
}

#[test]
fn number_types_with_reserved_bits_are_damaged() {
    // float32 LE as h5py writes it: class 1 version 1, byte order LE, sign at bit 31
    assert!(!reserved_bits_set(&[0x11, 0x20, 0x1f, 0x00]));
    // its class bit flipped to fixed point: the float's mantissa-normalisation bit is reserved there
    assert!(reserved_bits_set(&[0x10, 0x20, 0x1f, 0x00]));
    assert!(!reserved_bits_set(&[0x10, 0x08, 0x00, 0x00])); // signed integer
    assert!(reserved_bits_set(&[0x11, 0x20, 0x1f, 0x01]));
    assert!(!reserved_bits_set(&[0x13, 0xff, 0xff, 0xff])); // a string: not checked here
}

#[test]
fn the_datasets_left_to_h5py_are_named_and_a_soft_link_is_not() {
    let (listing, _) = list_keeping_pages(bytes(&fixture()), Path::new("m.h5")).unwrap();
    let Listing::Listed { left_to_libhdf5, .. } = listing else {
        panic!("{listing:?}")
    };
    // Big-endian and a tagged opaque type are h5py's to read; /layers/low/vars/2 links to a listed one.
    assert_eq!(left_to_libhdf5, ["/legacy/when", "/optimizer/vars/1"]);
}

#[test]
fn a_file_shorter_than_its_superblock_says_is_left_to_libhdf5() {
    let mut data = fixture();
    assert_eq!(data[8], 0, "superblock version 0: the end-of-file address at byte 40");
    let claimed = data.len() as u64 + 10;
    data[40..48].copy_from_slice(&claimed.to_le_bytes());
    let (listing, _) = list_keeping_pages(bytes(&data), Path::new("m.h5")).unwrap();
    let Listing::Listed { left_to_libhdf5, .. } = listing else {
        panic!("{listing:?}")
    };
    assert!(
        left_to_libhdf5.iter().any(|what| what.contains("truncated")),
        "{left_to_libhdf5:?}"
    );
}
