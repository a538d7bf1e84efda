//! Byte identity with bundles TensorFlow 2.21 wrote (testdata/, made by testdata/gen_fixtures.py), hostile
//! input, and round trips of the public API.

use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::sstable::tests::{block_handles, fix_block_crc};
use super::*;

const FIXTURES: [&str; 3] = ["checkpoint", "many_keys", "saved_model_variables"];

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rust/bundle/testdata")
}

/// A line of `NAME.manifest.tsv`: what TF's reader sees under a key.
struct Listed {
    key: Vec<u8>,
    dtype: i32,
    shape: Vec<i64>,
    /// Raw bytes (one piece) or string elements; None when not recorded.
    values: Option<Vec<Vec<u8>>>,
}

struct Bundle {
    index: Vec<u8>,
    data: Vec<u8>,
    manifest: Vec<Listed>,
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn load(dir: &Path, name: &str) -> Bundle {
    let read = |suffix: &str| std::fs::read(dir.join(format!("{name}{suffix}"))).unwrap();
    let manifest = String::from_utf8(read(".manifest.tsv")).unwrap();
    let manifest = manifest
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            let shape = if f[2] == "-" {
                vec![]
            } else {
                f[2].split(',').map(|d| d.parse().unwrap()).collect()
            };
            let empty = shape.contains(&0); // a "" value is then no element, not one empty string
            let values = (f[3] != "*").then(|| {
                if empty {
                    vec![]
                } else {
                    f[3].split(',').map(unhex).collect()
                }
            });
            Listed {
                key: unhex(f[0]),
                dtype: f[1].parse().unwrap(),
                shape,
                values,
            }
        })
        .collect();
    Bundle {
        index: read(".index"),
        data: read(".data-00000-of-00001"),
        manifest,
    }
}

fn tensor_bytes<'a>(b: &'a Bundle, e: &TensorEntry) -> &'a [u8] {
    &b.data[e.offset as usize..(e.offset + e.size) as usize]
}

/// Parses TF's index, re-encodes it, and checks everything against TF's own reader.
fn check_against_tensorflow(b: &Bundle, name: &str) {
    let (header, entries) = read_index(&b.index, name).unwrap();
    assert_eq!(header, BundleHeader::default());
    assert_eq!(
        write_index(&header, &entries).unwrap(),
        b.index,
        "{name}: re-encoded index differs"
    );
    check_shards(&header, &entries, &[b.data.len() as u64], name).unwrap();

    for e in entries.iter().filter(|e| !e.is_partitioned()) {
        verify_tensor(e, tensor_bytes(b, e), name).unwrap();
    }
    // Every key TF's reader lists, with its dtype, shape and values. The only keys it does not list
    // are the slices of partitioned tensors (ordered-code keys starting with a 0 byte).
    for listed in &b.manifest {
        let e = entries.iter().find(|e| e.key == listed.key).unwrap();
        assert_eq!(
            (e.dtype, &e.shape),
            (listed.dtype, &listed.shape),
            "{name}: {}",
            e.key_display()
        );
        let Some(values) = &listed.values else { continue };
        let data = tensor_bytes(b, e);
        if e.dtype == dtype::DT_STRING {
            assert_eq!(&decode_string_tensor(e, data, name).unwrap(), values);
            // The writer side: the same bytes and checksum from the elements.
            assert_eq!(encode_string_tensor(values), (data.to_vec(), e.crc32c));
            assert_eq!(string_tensor_size(values), e.size);
        } else {
            assert_eq!(data, values.concat().as_slice(), "{name}: {}", e.key_display());
        }
    }
    let unlisted: Vec<_> = entries
        .iter()
        .filter(|e| !b.manifest.iter().any(|m| m.key == e.key))
        .collect();
    assert!(
        unlisted.iter().all(|e| e.key.first() == Some(&0)),
        "{name}: {unlisted:?}"
    );

    // The data file's layout: TF packed the tensors in Add() order; sorting by offset recovers that
    // order (an empty tensor before the one that starts where it does), and planning reproduces it.
    let mut planned: Vec<TensorEntry> = entries.iter().filter(|e| !e.is_partitioned()).cloned().collect();
    planned.sort_by_key(|e| (e.offset, e.size));
    let want: Vec<u64> = planned.iter().map(|e| e.offset).collect();
    planned.iter_mut().for_each(|e| e.offset = 12345);
    assert_eq!(plan_data_layout(&mut planned).unwrap(), b.data.len() as u64);
    assert_eq!(planned.iter().map(|e| e.offset).collect::<Vec<_>>(), want);
}

#[test]
fn tensorflow_fixtures_are_byte_identical() {
    for name in FIXTURES {
        check_against_tensorflow(&load(&testdata(), name), name);
    }
}

#[test]
fn tensorflow_fixture_facts() {
    let b = load(&testdata(), "checkpoint");
    let (_, entries) = read_index(&b.index, "checkpoint").unwrap();
    let get = |k: &str| entries.iter().find(|e| e.key == k.as_bytes()).unwrap();
    // Data order is creation order, not key order, and the object graph comes last.
    let zz = get("zz_scalar/.ATTRIBUTES/VARIABLE_VALUE");
    assert_eq!((zz.offset, zz.size, zz.shape.len()), (0, 4, 0));
    let graph = get("_CHECKPOINTABLE_OBJECT_GRAPH");
    assert_eq!(
        (graph.dtype, graph.offset + graph.size),
        (dtype::DT_STRING, b.data.len() as u64)
    );
    let bf16 = get("bf16/.ATTRIBUTES/VARIABLE_VALUE");
    assert_eq!((bf16.dtype, bf16.size), (dtype::DT_BFLOAT16, 6));
    let empty = get("empty/.ATTRIBUTES/VARIABLE_VALUE");
    assert_eq!((empty.shape.as_slice(), empty.size, empty.crc32c), (&[0, 3][..], 0, 0));

    let b = load(&testdata(), "many_keys");
    let (_, entries) = read_index(&b.index, "many_keys").unwrap();
    assert!(entries.len() > 2 * sstable::RESTART_INTERVAL);
    let get = |k: &str| entries.iter().find(|e| e.key == k.as_bytes()).unwrap();
    // An empty string tensor is the 4 bytes of the (masked) checksum of no lengths.
    let empty = get("strings/empty");
    assert_eq!(tensor_bytes(&b, empty), mask_crc(0).to_le_bytes());
    assert!(get("partitioned/rows_0_2").is_partitioned());
}

/// The multi-block case (index > 256 KiB, and a key over 2 × block size), written by TensorFlow at test
/// time when the project's venv has it: too big to commit.
#[test]
fn tensorflow_multi_block_index_is_byte_identical() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    if !python.exists() {
        eprintln!("skipped: no {}", python.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(&python)
        .arg(testdata().join("gen_fixtures.py"))
        .arg("--multi-block")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("No module named 'tensorflow'") {
        eprintln!("skipped: TensorFlow is not installed in {}", python.display());
        return;
    }
    assert!(out.status.success(), "gen_fixtures.py --multi-block failed:\n{stderr}");
    let b = load(dir.path(), "multi_block");
    assert!(block_handles(&b.index).len() > 4, "expected at least 3 data blocks");
    check_against_tensorflow(&b, "multi_block");
}

#[test]
fn truncated_and_bit_flipped_indexes_never_panic() {
    for name in FIXTURES {
        let index = load(&testdata(), name).index;
        for len in 0..index.len() {
            assert!(read_index(&index[..len], name).is_err(), "{name} cut to {len} bytes");
        }
        for bit in 0..index.len() * 8 {
            let mut bad = index.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let _ = read_index(&bad, name);
        }
        // Flips inside blocks, with the block checksum fixed so the parsers see them.
        for block in block_handles(&index) {
            for bit in 0..(block.1 + 1) * 8 {
                let mut bad = index.clone();
                bad[block.0 + bit / 8] ^= 1 << (bit % 8);
                fix_block_crc(&mut bad, block);
                if let Ok((_, entries)) = read_index(&bad, name) {
                    assert!(entries.windows(2).all(|w| w[0].key < w[1].key));
                }
            }
        }
    }
}

#[test]
fn string_tensors() {
    let path = "t";
    let elements: [&[u8]; 3] = [b"", b"ab", &[7u8; 300]];
    let (data, crc) = encode_string_tensor(&elements);
    assert_eq!(data.len() as u64, string_tensor_size(&elements));
    assert_eq!(&data[..4], &[0, 2, 0xac, 0x02], "varint64 lengths");
    let mut e = TensorEntry::new("s", dtype::DT_STRING, vec![3]);
    e.size = data.len() as u64;
    e.crc32c = crc;
    assert_eq!(decode_string_tensor(&e, &data, path).unwrap(), elements);
    verify_tensor(&e, &data, path).unwrap();

    // Length checksum, entry checksum, truncation, trailing bytes, lying lengths.
    let mut bad = data.clone();
    bad[4] ^= 1;
    assert!(decode_string_tensor(&e, &bad, path)
        .unwrap_err()
        .to_string()
        .contains("lengths' checksum"));
    let mut bad = data.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert!(decode_string_tensor(&e, &bad, path)
        .unwrap_err()
        .to_string()
        .contains("checksum does not match"));
    let short = TensorEntry {
        size: e.size - 1,
        ..e.clone()
    };
    assert!(decode_string_tensor(&short, &data[..data.len() - 1], path).is_err());
    let mut long = data.clone();
    long.push(0);
    let long_entry = TensorEntry {
        size: e.size + 1,
        ..e.clone()
    };
    assert!(decode_string_tensor(&long_entry, &long, path)
        .unwrap_err()
        .to_string()
        .contains("after the last"));
    let mut huge = vec![0xff; 9];
    huge.push(0x01);
    huge.extend_from_slice(&[0; 8]);
    let huge_entry = TensorEntry {
        shape: vec![1],
        size: huge.len() as u64,
        ..e.clone()
    };
    assert!(decode_string_tensor(&huge_entry, &huge, path).is_err());
    let many = TensorEntry {
        shape: vec![1 << 40],
        ..e.clone()
    };
    assert!(decode_string_tensor(&many, &data, path)
        .unwrap_err()
        .to_string()
        .contains("cannot hold"));
    // Wrong calls are argument errors, not file errors.
    assert!(matches!(
        decode_string_tensor(&e, &data[1..], path),
        Err(Error::Argument(_))
    ));
    let float = TensorEntry { dtype: 1, ..e.clone() };
    assert!(matches!(
        decode_string_tensor(&float, &data, path),
        Err(Error::Argument(_))
    ));

    // An empty tensor: TF writes the 4 checksum bytes; a zero-size entry (which TF reads as nothing) also passes.
    let (data, crc) = encode_string_tensor::<&[u8]>(&[]);
    assert_eq!(data, mask_crc(0).to_le_bytes());
    let empty = TensorEntry {
        shape: vec![0],
        size: 4,
        crc32c: crc,
        ..e.clone()
    };
    assert!(decode_string_tensor(&empty, &data, path).unwrap().is_empty());
    let nothing = TensorEntry {
        shape: vec![0],
        size: 0,
        crc32c: 0,
        ..e
    };
    assert!(decode_string_tensor(&nothing, &[], path).unwrap().is_empty());
}

#[test]
fn sharded_bundles_read_back_from_every_shard() {
    use files::{sharded_index, BundleFiles, BundleTensor, BundleWriter, TensorData};

    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("w");
    let tensor = |key: &str, bytes: &'static [u8]| BundleTensor {
        key: key.as_bytes().to_vec(),
        dtype: dtype::DT_INT8,
        shape: vec![bytes.len() as i64],
        data: TensorData::Bytes(bytes),
    };
    let shards: [&[BundleTensor<'_>]; 3] = [
        &[tensor("b", b"bbbb"), tensor("a", b"aa")],
        &[tensor("c", b"c")],
        &[tensor("e", b""), tensor("d", b"dddddd")],
    ];
    let mut writers = Vec::new();
    for (i, tensors) in shards.iter().enumerate() {
        let path = PathBuf::from(format!("{}{}", prefix.display(), data_file_name("", i as u32, 3)));
        let file = std::fs::File::options()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut writer = BundleWriter::default();
        writer.add(&file, &path, tensors, 1).unwrap();
        writer.finish_data(&file, &path).unwrap();
        writers.push(writer);
    }
    let index = sharded_index(&writers.iter().collect::<Vec<_>>()).unwrap();
    std::fs::write(format!("{}.index", prefix.display()), &index).unwrap();
    let bundle = BundleFiles::open(&prefix).unwrap();
    for (key, want, shard) in [
        ("a", &b"aa"[..], 0),
        ("b", b"bbbb", 0),
        ("c", b"c", 1),
        ("d", b"dddddd", 2),
    ] {
        let i = bundle.find(key.as_bytes()).unwrap();
        assert_eq!(bundle.entries[i].shard_id, shard, "{key}");
        let mut got = vec![0u8; want.len()];
        bundle.read_into(&mut [(i, &mut got[..])], 1).unwrap();
        assert_eq!(got, want, "{key}");
    }
    assert!(sharded_index(&[]).is_err());
    // A shard missing on disk is refused when the bundle is opened.
    std::fs::remove_file(format!("{}{}", prefix.display(), data_file_name("", 1, 3))).unwrap();
    assert!(BundleFiles::open(&prefix).is_err());
}

#[test]
fn crcs_and_names() {
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    assert_eq!(mask_crc(0), 0xa282_ead8);
    for c in [0, 1, 0xdead_beef, u32::MAX] {
        assert_eq!(unmask_crc(mask_crc(c)), c);
        #[allow(clippy::manual_rotate)] // TF's formula, spelled as TF spells it
        let tf_mask = ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8);
        assert_eq!(mask_crc(c), tf_mask);
    }
    let (a, b) = (b"hello ".as_slice(), b"world".as_slice());
    assert_eq!(crc32c_append(crc32c(a), b), crc32c(b"hello world"));
    assert_eq!(crc32c_combine(crc32c(a), crc32c(b), b.len()), crc32c(b"hello world"));
    assert_eq!(
        data_file_name("dir/variables", 0, 1),
        "dir/variables.data-00000-of-00001"
    );
    assert_eq!(data_file_name("p", 12, 123456), "p.data-00012-of-123456");
    assert_eq!(index_file_name("dir/variables"), "dir/variables.index");
    assert_eq!((dtype_name(14), dtype_size(14)), (Some("bfloat16"), Some(2)));
    assert_eq!(
        (dtype_size(dtype::DT_STRING), dtype_size(99), dtype_name(-1)),
        (None, None, None)
    );
}

#[test]
fn writer_and_checks_refuse_bad_input() {
    let a = TensorEntry {
        size: 4,
        ..TensorEntry::new("a", 1, vec![])
    };
    assert!(write_index(&BundleHeader::default(), &[a.clone(), a.clone()]).is_err());
    assert!(write_index(&BundleHeader::default(), &[TensorEntry::new("", 1, vec![])]).is_err());
    let huge = TensorEntry {
        size: u64::MAX / 2 + 1,
        ..a.clone()
    };
    assert!(plan_data_layout(&mut [huge]).is_err());

    let header = BundleHeader::default();
    let at = |offset, shard_id| TensorEntry {
        offset,
        shard_id,
        ..a.clone()
    };
    check_shards(&header, &[at(0, 0), at(6, 0)], &[10], "p").unwrap();
    assert!(check_shards(&header, &[at(7, 0)], &[10], "p").is_err());
    assert!(check_shards(&header, &[at(u64::MAX, 0)], &[10], "p").is_err());
    assert!(check_shards(&header, &[at(0, 1)], &[10], "p").is_err());
    assert!(check_shards(&header, &[at(0, 0)], &[10, 10], "p").is_err());
    assert!(verify_tensor(&a, &[0; 4], "p")
        .unwrap_err()
        .to_string()
        .contains("checksum"));
    let ok = TensorEntry {
        crc32c: crc32c(&[0; 4]),
        ..a
    };
    verify_tensor(&ok, &[0; 4], "p").unwrap();

    // An index whose entry claims a shard the header does not have.
    let bad = write_index(
        &header,
        &[TensorEntry {
            shard_id: 1,
            ..ok.clone()
        }],
    )
    .unwrap();
    assert!(read_index(&bad, "p").unwrap_err().to_string().contains("shard 1 of 1"));
    // An index without the header.
    let headless = sstable::write_table([(b"a".as_slice(), ok.encode().as_slice())]).unwrap();
    assert!(read_index(&headless, "p")
        .unwrap_err()
        .to_string()
        .contains("no header"));
}

fn arb_entries() -> impl Strategy<Value = Vec<TensorEntry>> {
    prop::collection::btree_map(
        prop::collection::vec(any::<u8>(), 1..60),
        (
            prop::sample::select(vec![1, 2, 7, 9, 10, 14, 19]),
            prop::collection::vec(0i64..6, 0..4),
            any::<u32>(),
        ),
        0..120,
    )
    .prop_map(|map| {
        map.into_iter()
            .map(|(key, (dtype, shape, crc32c))| {
                let n = shape.iter().product::<i64>() as u64;
                TensorEntry {
                    size: dtype_size(dtype).map_or(n + 4, |w| n * w),
                    crc32c,
                    ..TensorEntry::new(key, dtype, shape)
                }
            })
            .collect()
    })
}

proptest! {
    #[test]
    fn index_round_trip(mut entries in arb_entries(), reverse in any::<bool>()) {
        if reverse {
            entries.reverse();
        }
        let total = plan_data_layout(&mut entries).unwrap();
        prop_assert_eq!(total, entries.iter().map(|e| e.size).sum::<u64>());
        let header = BundleHeader::default();
        let bytes = write_index(&header, &entries).unwrap();
        let (h, got) = read_index(&bytes, "p").unwrap();
        prop_assert_eq!(h, header);
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        prop_assert_eq!(got, entries);
    }

    #[test]
    fn random_indexes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
        let _ = read_index(&bytes, "p");
    }

    #[test]
    fn mutated_indexes_never_panic(seed in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let index = load(&testdata(), "many_keys").index;
        let mut bad = index.clone();
        for (at, byte) in &seed {
            let i = at.index(bad.len());
            bad[i] = *byte;
        }
        for block in block_handles(&index) {
            fix_block_crc(&mut bad, block);
        }
        let _ = read_index(&bad, "p");
    }
}
