//! A `.keras` zip as the load reads it: the central directory, each member's local header and
//! data offset, the zip-bomb check, and the inflating of small members (DEFLATED ones included).
#![no_main]

use std::io::{Seek, Write};
use std::path::Path;
use std::sync::Mutex;

use _core::zip::{check_not_bomb, data_offset, read_directory, read_member};
use libfuzzer_sys::fuzz_target;

/// One scratch file per process, rewritten for each input (the reader takes an open file).
static SCRATCH: Mutex<Option<std::fs::File>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut scratch = SCRATCH.lock().unwrap();
    let file = scratch.get_or_insert_with(|| tempfile_in_shm());
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

fn tempfile_in_shm() -> std::fs::File {
    let dir = if Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let path = Path::new(dir).join(format!("ksf-fuzz-zip-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let _ = std::fs::remove_file(&path); // unlinked: nothing is left behind
    file
}
