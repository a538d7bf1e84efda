//! A `.keras` zip as the load reads it: the central directory, each member's local header and
//! data offset, the zip-bomb check, and the inflating of small members (DEFLATED ones included).
#![no_main]

use std::io::{Seek, Write};
use std::path::Path;
use std::sync::Mutex;

use _core::zip::{check_not_bomb, data_offset, read_directory, read_member};
use libfuzzer_sys::fuzz_target;

/// One scratch file per process (unlinked; in memory where /dev/shm is), rewritten for each input:
/// the reader takes an open file.
static SCRATCH: Mutex<Option<std::fs::File>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut scratch = SCRATCH.lock().unwrap();
    let file = scratch.get_or_insert_with(|| {
        tempfile::tempfile_in("/dev/shm")
            .or_else(|_| tempfile::tempfile())
            .unwrap()
    });
    file.set_len(0).unwrap();
    file.rewind().unwrap();
    file.write_all(data).unwrap();
    let path = Path::new("fuzz.keras");
    let Ok(members) = read_directory(file, path) else {
        return;
    };
    for member in &members {
        let _ = data_offset(file, path, member);
        if check_not_bomb(path, member).is_ok() && member.size < 1 << 20 {
            let _ = read_member(file, path, member);
        }
    }
});
