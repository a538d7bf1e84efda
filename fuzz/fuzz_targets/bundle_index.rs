//! A TensorFlow checkpoint's `.index` (the SSTable and its BundleEntryProtos) as the load reads
//! it, then each entry checked against the same bytes standing in for its data shard: the shard
//! bounds, the CRC32C and string-tensor decoding.
#![no_main]

use _core::bundle::{check_shards, decode_string_tensor, dtype, read_index, verify_tensor};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((header, entries)) = read_index(data, "fuzz.index") else {
        return;
    };
    let shards = vec![data.len() as u64; usize::try_from(header.num_shards).unwrap_or(0).min(64)];
    if check_shards(&header, &entries, &shards, "fuzz.data").is_err() {
        return;
    }
    for entry in &entries {
        let range = usize::try_from(entry.offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(usize::try_from(entry.size).ok()?)?));
        let Some(bytes) = range.and_then(|r| data.get(r)) else {
            continue;
        };
        let _ = verify_tensor(entry, bytes, "fuzz.data");
        if entry.dtype == dtype::DT_STRING {
            let _ = decode_string_tensor(entry, bytes, "fuzz.data");
        }
    }
});
