//! HDF5, the container of Keras' weights (`.weights.h5`, legacy `.h5`, the `model.weights.h5` of a
//! `.keras` zip). Reading goes through the pure-Rust `hdf5-reader` crate, with what untrusted
//! files need on top (`reader.rs`): bounded reads, hard links only, no cycles, datatypes checked
//! bit for bit before a byte is taken as a number.

pub mod chunks;
pub mod filters;
pub mod layout;
pub mod object_header;
pub mod reader;
pub mod shuffle;

pub use reader::{
    list_keeping_pages, list_stored_datasets, Chunk, Chunked, Listing, Pages, Source, StoredDataset, BLOCK,
};
