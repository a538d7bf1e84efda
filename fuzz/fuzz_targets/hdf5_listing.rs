//! The HDF5 walk every Keras load runs before libhdf5 sees the file. Built with `--cfg fuzzing`,
//! `list_stored_datasets` does not catch panics, so one found inside the parser crate fails here.
#![no_main]

use std::path::Path;
use std::sync::Arc;

use _core::hdf5::reader::{list_stored_datasets, Listing, Source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Listing::Listed(found)) = list_stored_datasets(Source::Bytes(Arc::from(data)), Path::new("fuzz.h5")) {
        for d in found {
            assert!(d.offset + d.nbytes <= data.len() as u64, "{d:?} lies past the end");
        }
    }
});
