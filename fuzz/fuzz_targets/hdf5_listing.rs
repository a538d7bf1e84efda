//! The HDF5 walk every Keras load runs before libhdf5 sees the file. Built with `--cfg fuzzing`,
//! `list_stored_datasets` does not catch panics, so one found inside the parser crate fails here.
#![no_main]

use std::path::Path;
use std::sync::Arc;

use _core::hdf5::reader::{list_stored_datasets, Listing, Source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let listing = list_stored_datasets(Source::Bytes(Arc::from(data)), Path::new("fuzz.h5"));
    if let Ok(Listing::Listed { datasets, .. }) = listing {
        for d in datasets {
            assert!(d.offset + d.nbytes <= data.len() as u64, "{d:?} lies past the end");
        }
    }
});
