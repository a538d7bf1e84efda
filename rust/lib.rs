//! Python bindings of the Rust core: the only file that knows pyo3. Each wrapper turns Python
//! buffers into byte slices once, then releases the GIL while the bytes move.

use std::ffi::{c_int, c_void};
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple, PyType};

pub mod bundle;
pub mod error;
pub mod hdf5;
pub mod io;
pub mod zip;

use error::Error;

pyo3::create_exception!(
    kerassave_fast._core,
    KerasSaveError,
    PyValueError,
    "A saved-model file is malformed: truncated, corrupted, hostile or not the format its name says."
);

static BAD_KERAS_ZIP_FILE: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// `BadKerasZipFile(KerasSaveError, zipfile.BadZipFile)`: code written for stock, which raises
/// `zipfile.BadZipFile` for a broken zip, keeps catching it.
fn bad_keras_zip_file(py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
    let cls = BAD_KERAS_ZIP_FILE.get_or_try_init(py, || -> PyResult<Py<PyType>> {
        let bad_zip_file = py.import("zipfile")?.getattr("BadZipFile")?;
        let bases = PyTuple::new(py, [py.get_type::<KerasSaveError>().into_any(), bad_zip_file])?;
        let namespace = PyDict::new(py);
        namespace.set_item("__module__", "kerassave_fast._core")?;
        namespace.set_item("__doc__", "A `.keras` file whose zip container is malformed.")?;
        let cls = py.get_type::<PyType>().call1(("BadKerasZipFile", bases, namespace))?;
        Ok(cls.cast_into::<PyType>()?.unbind())
    })?;
    Ok(cls.bind(py).clone())
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let message = e.to_string();
        match e {
            Error::Zip { .. } => Python::attach(|py| match bad_keras_zip_file(py) {
                Ok(cls) => PyErr::from_type(cls, message),
                Err(_) => KerasSaveError::new_err(message),
            }),
            Error::Io { path, source, .. } => match source.raw_os_error() {
                // OSError(errno, strerror, filename) picks the matching subclass (FileNotFoundError, ...).
                Some(code) => PyOSError::new_err((code, message, path.into_os_string())),
                None => PyOSError::new_err(message),
            },
            Error::Format { .. } => KerasSaveError::new_err(message),
            Error::Argument(_) => PyValueError::new_err(message),
        }
    }
}

/// The objects' buffers (kept exported while held) and each one's (file offset, address, length),
/// checked to be C-contiguous, one per offset, and for reads writable and non-overlapping.
type Spans = (Vec<PyUntypedBuffer>, Vec<(u64, usize, usize)>);

fn tensor_spans(offsets: Vec<u64>, objects: &[Bound<'_, PyAny>], writable: bool) -> PyResult<Spans> {
    if offsets.len() != objects.len() {
        return Err(PyValueError::new_err(format!(
            "{} offsets for {} buffers",
            offsets.len(),
            objects.len()
        )));
    }
    let buffers: Vec<PyUntypedBuffer> = objects.iter().map(PyUntypedBuffer::get).collect::<PyResult<_>>()?;
    let mut spans = Vec::with_capacity(buffers.len());
    for (i, (b, offset)) in buffers.iter().zip(offsets).enumerate() {
        if !b.is_c_contiguous() {
            return Err(PyValueError::new_err(format!("buffer {i} is not C-contiguous")));
        }
        if writable && b.readonly() {
            return Err(PyValueError::new_err(format!("buffer {i} is read-only")));
        }
        spans.push((offset, b.buf_ptr() as usize, b.len_bytes()));
    }
    if writable {
        // Two tensors read into the same memory would be two `&mut` to it.
        let mut sorted: Vec<(usize, usize)> = spans.iter().filter(|s| s.2 > 0).map(|s| (s.1, s.2)).collect();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(PyValueError::new_err("destination buffers overlap"));
        }
    }
    Ok((buffers, spans))
}

/// # Safety
/// `ptr` must point to `len` readable bytes that stay valid for `'a` (unless `len` is 0).
unsafe fn bytes<'a>(ptr: usize, len: usize) -> &'a [u8] {
    if len == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(ptr as *const u8, len) }
    }
}

/// # Safety
/// As `bytes`, and nothing else may access the bytes for `'a`.
unsafe fn bytes_mut<'a>(ptr: usize, len: usize) -> &'a mut [u8] {
    if len == 0 {
        &mut []
    } else {
        unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) }
    }
}

/// A `File` of its own for the open descriptor `fd`, which Python keeps open during the call.
fn duplicate_fd(fd: i32) -> std::io::Result<File> {
    use std::os::fd::BorrowedFd;
    if fd < 0 {
        return Err(std::io::Error::from_raw_os_error(9)); // EBADF
    }
    // SAFETY: the caller holds `fd` open for the duration of this call; we only duplicate it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    Ok(File::from(borrowed.try_clone_to_owned()?))
}

/// An open file whose tensors are written or read at planned offsets.
#[pyclass(frozen, module = "kerassave_fast._core")]
struct TensorFile {
    file: Arc<File>,
    /// Exactly as given (bytes on Unix), for error messages and for code that reopens the file.
    path: PathBuf,
}

#[pymethods]
impl TensorFile {
    /// Opens an existing file, read-only or for reading and writing; with `fd`, uses (a duplicate
    /// of) that open descriptor instead of opening `path` again, so the file cannot be a different one.
    #[new]
    #[pyo3(signature = (path, writable = false, fd = None))]
    fn new(py: Python<'_>, path: PathBuf, writable: bool, fd: Option<i32>) -> PyResult<Self> {
        let file = match fd {
            Some(fd) => duplicate_fd(fd).map_err(|e| Error::io(&path, "dup", e))?,
            None => py
                .detach(|| File::options().read(true).write(writable).open(&path))
                .map_err(|e| Error::io(&path, "open", e))?,
        };
        Ok(TensorFile {
            file: Arc::new(file),
            path,
        })
    }

    /// The path as given (a `str`, non-UTF-8 bytes as `os.fsdecode` gives them).
    #[getter]
    fn path(&self) -> &std::ffi::OsStr {
        self.path.as_os_str()
    }

    fn fileno(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.file.as_raw_fd()
    }

    fn size(&self) -> PyResult<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| Error::io(&self.path, "stat", e))?
            .len())
    }

    /// Writes each buffer at its offset, in parallel; returns each one's CRC-32.
    #[pyo3(signature = (offsets, buffers, threads = 0))]
    fn write_tensors(
        &self,
        py: Python<'_>,
        offsets: Vec<u64>,
        buffers: Vec<Bound<'_, PyAny>>,
        threads: usize,
    ) -> PyResult<Vec<u32>> {
        let (buffers, spans) = tensor_spans(offsets, &buffers, false)?;
        let crcs = py.detach(|| {
            // SAFETY: `buffers` keeps every Py_buffer exported (memory valid, C-contiguous) until this returns.
            let tensors: Vec<(u64, &[u8])> = spans.iter().map(|&(o, p, n)| (o, unsafe { bytes(p, n) })).collect();
            io::write_tensors(&self.file, &self.path, &tensors, threads)
        })?;
        drop(buffers);
        Ok(crcs)
    }

    /// Fills each writable buffer from its offset, in parallel; returns each one's CRC-32.
    #[pyo3(signature = (offsets, buffers, threads = 0))]
    fn read_tensors(
        &self,
        py: Python<'_>,
        offsets: Vec<u64>,
        buffers: Vec<Bound<'_, PyAny>>,
        threads: usize,
    ) -> PyResult<Vec<u32>> {
        let (buffers, spans) = tensor_spans(offsets, &buffers, true)?;
        let crcs = py.detach(|| {
            // SAFETY: as in `write_tensors`; the buffers are writable and `tensor_spans` checked that
            // no two overlap, so each `&mut` is unique.
            let mut tensors: Vec<(u64, &mut [u8])> =
                spans.iter().map(|&(o, p, n)| (o, unsafe { bytes_mut(p, n) })).collect();
            io::read_tensors(&self.file, &self.path, &mut tensors, threads)
        })?;
        drop(buffers);
        Ok(crcs)
    }

    /// Reads chunked HDF5 datasets of the file starting at `start`: each item is (name, chunking
    /// as `hdf5_stored_datasets` lists it, shape, element size, writable buffer of the dataset);
    /// every chunk is read, checked, decoded and placed in parallel with the GIL released.
    /// Returns (offset from `start`, stored length, CRC-32 of the stored bytes) of every chunk read.
    #[pyo3(signature = (start, datasets, threads = 0))]
    fn read_chunked(
        &self,
        py: Python<'_>,
        start: u64,
        datasets: Vec<ChunkedReadTuple<'_>>,
        threads: usize,
    ) -> PyResult<Vec<(u64, u64, u32)>> {
        read_chunked_from(py, self.file.as_ref(), &self.path, start, datasets, threads)
    }

    /// CRC-32 of `length` bytes from `start`; `known` lists (offset, length, crc) stretches not to re-read.
    #[pyo3(signature = (start, length, known = Vec::new(), threads = 0))]
    fn crc32(
        &self,
        py: Python<'_>,
        start: u64,
        length: u64,
        known: Vec<(u64, u64, u32)>,
        threads: usize,
    ) -> PyResult<u32> {
        let known: Vec<io::KnownCrc> = known
            .into_iter()
            .map(|(offset, len, crc)| io::KnownCrc { offset, len, crc })
            .collect();
        Ok(py.detach(|| io::crc32_of_range(&self.file, &self.path, start, length, &known, threads))?)
    }
}

type DateTime = (u16, u8, u8, u8, u8, u8);

/// Frames STORED zip members in a `TensorFile`, the way `zipfile` frames stock `.keras` files.
#[pyclass(module = "kerassave_fast._core")]
struct ZipWriter {
    file: Arc<File>,
    inner: zip::ZipWriter,
}

#[pymethods]
impl ZipWriter {
    #[new]
    #[pyo3(signature = (file, zip64_limit = zip::ZIP64_LIMIT))]
    fn new(file: &TensorFile, zip64_limit: u64) -> Self {
        ZipWriter {
            file: file.file.clone(),
            inner: zip::ZipWriter::with_zip64_limit(&file.path, zip64_limit),
        }
    }

    fn add_stored(&mut self, name: &str, data: &[u8], date_time: DateTime, external_attr: u32) -> PyResult<()> {
        let when = zip::DosDateTime::from_parts(date_time)?;
        Ok(self.inner.add_stored(&self.file, name, when, external_attr, data)?)
    }

    /// Reserves a member whose data others write; returns the file offset where the data starts,
    /// a multiple of `alignment` (the local header is padded to it).
    #[pyo3(signature = (name, date_time, external_attr, size_hint, alignment=1))]
    fn begin_stored(
        &mut self,
        name: &str,
        date_time: DateTime,
        external_attr: u32,
        size_hint: u64,
        alignment: u64,
    ) -> PyResult<u64> {
        let when = zip::DosDateTime::from_parts(date_time)?;
        Ok(self
            .inner
            .begin_stored(name, when, external_attr, size_hint, alignment)?)
    }

    /// Where `begin_stored(name, ..., size_hint, alignment)` would start the data, reserving nothing.
    #[pyo3(signature = (name, size_hint, alignment=1))]
    fn data_start(&self, name: &str, size_hint: u64, alignment: u64) -> PyResult<u64> {
        Ok(self.inner.data_start(name, size_hint, alignment)?)
    }

    fn end_stored(&mut self, size: u64, crc32: u32) -> PyResult<()> {
        Ok(self.inner.end_stored(&self.file, size, crc32)?)
    }

    /// Writes the central directory; returns the archive's size.
    fn finish(&mut self) -> PyResult<u64> {
        Ok(self.inner.finish(&self.file)?)
    }
}

/// One member of a `ZipArchive`, as its central directory entry says.
#[pyclass(frozen, get_all, module = "kerassave_fast._core")]
struct ZipMember {
    index: usize,
    raw_name: Py<PyBytes>,
    flags: u16,
    method: u16,
    crc32: u32,
    compressed_size: u64,
    size: u64,
    header_offset: u64,
    external_attr: u32,
    date_time: DateTime,
}

/// The directory of a zip file, read without trusting it.
#[pyclass(frozen, module = "kerassave_fast._core")]
struct ZipArchive {
    file: Arc<File>,
    path: PathBuf,
    members: Vec<zip::Member>,
}

impl ZipArchive {
    fn member(&self, index: usize) -> PyResult<&zip::Member> {
        self.members
            .get(index)
            .ok_or_else(|| PyValueError::new_err(format!("no member {index} in {}", self.path.display())))
    }
}

#[pymethods]
impl ZipArchive {
    #[new]
    fn new(py: Python<'_>, file: &TensorFile) -> PyResult<Self> {
        let members = py.detach(|| zip::read_directory(&file.file, &file.path))?;
        Ok(ZipArchive {
            file: file.file.clone(),
            path: file.path.clone(),
            members,
        })
    }

    fn members(&self, py: Python<'_>) -> Vec<ZipMember> {
        self.members
            .iter()
            .enumerate()
            .map(|(index, m)| ZipMember {
                index,
                raw_name: PyBytes::new(py, &m.name).unbind(),
                flags: m.flags,
                method: m.method,
                crc32: m.crc32,
                compressed_size: m.compressed_size,
                size: m.size,
                header_offset: m.header_offset,
                external_attr: m.external_attr,
                date_time: m.modified.to_parts(),
            })
            .collect()
    }

    /// Where member `index`'s data starts, after checking its local header and that the data fits.
    fn data_offset(&self, index: usize) -> PyResult<u64> {
        let m = self.member(index)?;
        zip::check_not_bomb(&self.path, m)?;
        Ok(zip::data_offset(&self.file, &self.path, m)?)
    }

    /// The whole member, inflated if DEFLATED, size and CRC checked.
    fn read<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Bound<'py, PyBytes>> {
        let m = self.member(index)?;
        let data = py.detach(|| zip::read_member(&self.file, &self.path, m))?;
        Ok(PyBytes::new(py, &data))
    }

    /// Checks a STORED member's CRC-32 by reading it in parallel, as `zipfile` does when reading it whole.
    #[pyo3(signature = (index, threads = 0))]
    fn check_crc(&self, py: Python<'_>, index: usize, threads: usize) -> PyResult<()> {
        let m = self.member(index)?;
        let start = self.data_offset(index)?;
        let crc = py.detach(|| io::crc32_of_range(&self.file, &self.path, start, m.compressed_size, &[], threads))?;
        if crc != m.crc32 {
            let name = String::from_utf8_lossy(&m.name);
            return Err(Error::zip(&self.path, format!("Bad CRC-32 for file '{name}'")).into());
        }
        Ok(())
    }
}

/// One tensor for `TensorBundleWriter.add`: checkpoint key, `DataType` enum value, shape, and its value:
/// a C-contiguous buffer (fixed-size dtypes) or a sequence of `bytes` (DT_STRING).
type BundleItem<'py> = (String, i32, Vec<i64>, Bound<'py, PyAny>);

/// Where a bundle tensor's bytes come from while the GIL is released.
enum BundleSource {
    /// (address, length) of a buffer kept exported by the caller.
    Buffer(usize, usize),
    Strings(Vec<Vec<u8>>),
}

/// Bundle tensors taken from Python: the buffers (kept exported while held) and each tensor's parts.
type BundleBatch = (Vec<PyUntypedBuffer>, Vec<(Vec<u8>, i32, Vec<i64>, BundleSource)>);

fn bundle_batch(tensors: Vec<BundleItem<'_>>) -> PyResult<BundleBatch> {
    let mut exported: Vec<PyUntypedBuffer> = Vec::new();
    let mut planned = Vec::with_capacity(tensors.len());
    for (i, (key, dtype, shape, value)) in tensors.into_iter().enumerate() {
        let source = if dtype == bundle::dtype::DT_STRING {
            let elements: Vec<Bound<'_, PyBytes>> = value.extract()?;
            BundleSource::Strings(elements.iter().map(|b| b.as_bytes().to_vec()).collect())
        } else {
            let buffer = PyUntypedBuffer::get(&value)?;
            if !buffer.is_c_contiguous() {
                return Err(PyValueError::new_err(format!("buffer {i} is not C-contiguous")));
            }
            let span = BundleSource::Buffer(buffer.buf_ptr() as usize, buffer.len_bytes());
            exported.push(buffer);
            span
        };
        planned.push((key.into_bytes(), dtype, shape, source));
    }
    Ok((exported, planned))
}

/// # Safety
/// Every `BundleSource::Buffer` must stay exported (valid, unchanged) for `'a`.
unsafe fn bundle_tensors<'a>(
    planned: &'a [(Vec<u8>, i32, Vec<i64>, BundleSource)],
) -> Vec<bundle::files::BundleTensor<'a>> {
    planned
        .iter()
        .map(|(key, dtype, shape, source)| bundle::files::BundleTensor {
            key: key.clone(),
            dtype: *dtype,
            shape: shape.clone(),
            data: match source {
                BundleSource::Buffer(ptr, len) => bundle::files::TensorData::Bytes(unsafe { bytes(*ptr, *len) }),
                BundleSource::Strings(elements) => bundle::files::TensorData::Strings(elements.clone()),
            },
        })
        .collect()
}

/// Writes a single-shard tensor bundle: its data file batch by batch (`add`, each batch packed after the
/// previous one, CRC32C computed in parallel as the bytes are written, the GIL released, so a batch can
/// be written on one thread while another works out the next), then its index (`finish`).
#[pyclass(frozen, module = "kerassave_fast._core")]
struct TensorBundleWriter {
    data: Arc<File>,
    data_path: PathBuf,
    index: Arc<File>,
    index_path: PathBuf,
    inner: std::sync::Mutex<bundle::files::BundleWriter>,
}

impl TensorBundleWriter {
    fn with_inner<T>(&self, f: impl FnOnce(&mut bundle::files::BundleWriter) -> T) -> T {
        let mut inner = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut inner)
    }
}

#[pymethods]
impl TensorBundleWriter {
    /// `data_file` and `index_file` must be new, empty, writable files.
    #[new]
    fn new(data_file: &TensorFile, index_file: &TensorFile) -> Self {
        TensorBundleWriter {
            data: data_file.file.clone(),
            data_path: data_file.path.clone(),
            index: index_file.file.clone(),
            index_path: index_file.path.clone(),
            inner: Default::default(),
        }
    }

    /// Writes `tensors` after those already written.
    #[pyo3(signature = (tensors, threads = 0))]
    fn add(&self, py: Python<'_>, tensors: Vec<BundleItem<'_>>, threads: usize) -> PyResult<()> {
        let (exported, planned) = bundle_batch(tensors)?;
        py.detach(|| {
            // SAFETY: `exported` keeps every Py_buffer exported (memory valid, C-contiguous) until this returns.
            let tensors = unsafe { bundle_tensors(&planned) };
            self.with_inner(|w| w.add(&self.data, &self.data_path, &tensors, threads))
        })?;
        drop(exported);
        Ok(())
    }

    /// Drops everything written, to start over.
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py.detach(|| self.with_inner(|w| w.reset(&self.data, &self.data_path)))?)
    }

    fn __len__(&self) -> usize {
        self.with_inner(|w| w.len())
    }

    /// Writes the index; returns (data bytes, index bytes).
    fn finish(&self, py: Python<'_>) -> PyResult<(u64, u64)> {
        Ok(py.detach(|| -> Result<(u64, u64), Error> {
            let (index, data_len) =
                self.with_inner(|w| Ok::<_, Error>((w.finish(&self.data, &self.data_path)?, w.data_len())))?;
            use std::os::unix::fs::FileExt;
            self.index
                .write_all_at(&index, 0)
                .map_err(|e| Error::io(&self.index_path, "write", e))?;
            self.index
                .set_len(index.len() as u64)
                .map_err(|e| Error::io(&self.index_path, "truncate", e))?;
            Ok((data_len, index.len() as u64))
        })?)
    }
}

/// Finishes a sharded bundle: each writer's data file (shard `i` of `len(shards)`) cut to what it
/// wrote, and the index of all of them written to `index_file`. Returns the index's length.
#[pyfunction]
fn bundle_write_sharded_index(
    py: Python<'_>,
    index_file: &TensorFile,
    shards: Vec<PyRef<'_, TensorBundleWriter>>,
) -> PyResult<u64> {
    let writers: Vec<&TensorBundleWriter> = shards.iter().map(|w| &**w).collect();
    for (i, w) in writers.iter().enumerate() {
        if writers[..i].iter().any(|other| std::ptr::eq(*other, *w)) {
            return Err(PyValueError::new_err(format!("shard {i}: the same writer twice")));
        }
    }
    Ok(py.detach(|| -> Result<u64, Error> {
        let guards: Vec<_> = writers
            .iter()
            .map(|w| w.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
            .collect();
        for (w, inner) in writers.iter().zip(&guards) {
            inner.finish_data(&w.data, &w.data_path)?;
        }
        let inners: Vec<&bundle::files::BundleWriter> = guards.iter().map(|g| &**g).collect();
        let index = bundle::files::sharded_index(&inners)?;
        use std::os::unix::fs::FileExt;
        index_file
            .file
            .write_all_at(&index, 0)
            .map_err(|e| Error::io(&index_file.path, "write", e))?;
        index_file
            .file
            .set_len(index.len() as u64)
            .map_err(|e| Error::io(&index_file.path, "truncate", e))?;
        Ok(index.len() as u64)
    })?)
}

/// (key, dtype enum, shape, size in bytes, partitioned, shard, offset) of a bundle entry.
type BundleEntryInfo = (String, i32, Vec<i64>, u64, bool, i32, u64);

/// An open tensor bundle (`prefix.index` + `prefix.data-*`), its index read and validated by the Rust core.
#[pyclass(frozen, module = "kerassave_fast._core")]
struct TensorBundleReader {
    inner: bundle::files::BundleFiles,
}

impl TensorBundleReader {
    fn index_of(&self, key: &str) -> PyResult<usize> {
        self.inner
            .find(key.as_bytes())
            .ok_or_else(|| PyValueError::new_err(format!("{}: no tensor {key:?}", self.inner.index_path.display())))
    }
}

#[pymethods]
impl TensorBundleReader {
    /// Reads `prefix.index`, opens the data shards and checks every entry lies inside its shard.
    #[new]
    fn new(py: Python<'_>, prefix: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| bundle::files::BundleFiles::open(&prefix))?;
        Ok(TensorBundleReader { inner })
    }

    #[getter]
    fn index_path(&self) -> &std::ffi::OsStr {
        self.inner.index_path.as_os_str()
    }

    #[getter]
    fn num_shards(&self) -> i32 {
        self.inner.header.num_shards
    }

    /// (key, dtype enum, shape, size in bytes, partitioned, shard, offset) of every entry, in key order.
    fn entries(&self) -> Vec<BundleEntryInfo> {
        self.inner
            .entries
            .iter()
            .map(|e| {
                (
                    String::from_utf8_lossy(&e.key).into_owned(),
                    e.dtype,
                    e.shape.clone(),
                    e.size,
                    e.is_partitioned(),
                    e.shard_id,
                    e.offset,
                )
            })
            .collect()
    }

    /// Fills each writable buffer with the tensor under its key, in parallel, CRC32C checked.
    #[pyo3(signature = (keys, buffers, threads = 0))]
    fn read_tensors(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        buffers: Vec<Bound<'_, PyAny>>,
        threads: usize,
    ) -> PyResult<()> {
        let indices: Vec<usize> = keys.iter().map(|k| self.index_of(k)).collect::<PyResult<_>>()?;
        let offsets = indices.iter().map(|&i| self.inner.entries[i].offset).collect();
        let (buffers, spans) = tensor_spans(offsets, &buffers, true)?;
        py.detach(|| {
            // SAFETY: `buffers` keeps each writable Py_buffer exported until this returns, and
            // `tensor_spans` checked that no two overlap, so each `&mut` is unique.
            let mut requests: Vec<(usize, &mut [u8])> = indices
                .iter()
                .zip(&spans)
                .map(|(&i, &(_, p, n))| (i, unsafe { bytes_mut(p, n) }))
                .collect();
            self.inner.read_into(&mut requests, threads)
        })?;
        drop(buffers);
        Ok(())
    }

    /// The elements of the DT_STRING tensor under `key`, checksums checked.
    fn read_strings<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let index = self.index_of(key)?;
        let elements = py.detach(|| self.inner.read_strings(index))?;
        Ok(elements.iter().map(|s| PyBytes::new(py, s)).collect())
    }
}

/// A dataset readable by offset: (h5py path, offset in the HDF5 file, shape, numpy dtype name).
/// (offset in the HDF5 file, stored size, filter mask, element coordinates) of one chunk.
type ChunkTuple = (u64, u64, u32, Vec<u64>);
/// (chunk shape, filter ids, chunks) of a chunked dataset.
type ChunkingTuple = (Vec<u64>, Vec<u16>, Vec<ChunkTuple>);
type StoredDatasetTuple = (String, u64, Vec<u64>, &'static str, Option<ChunkingTuple>);
/// (dataset name, chunking, shape, element size, writable buffer) for `TensorFile.read_chunked`.
type ChunkedReadTuple<'py> = (String, ChunkingTuple, Vec<u64>, usize, Bound<'py, PyAny>);

fn chunking_tuple(c: hdf5::Chunked) -> ChunkingTuple {
    let chunks = c
        .chunks
        .into_iter()
        .map(|k| (k.offset, k.size, k.skipped, k.coords))
        .collect();
    (c.chunk_shape, c.filters, chunks)
}

fn chunked_from(tuple: ChunkingTuple) -> hdf5::Chunked {
    let (chunk_shape, filters, chunks) = tuple;
    let chunks = chunks
        .into_iter()
        .map(|(offset, size, skipped, coords)| hdf5::Chunk {
            offset,
            size,
            skipped,
            coords,
        })
        .collect();
    hdf5::Chunked {
        chunk_shape,
        filters,
        chunks,
    }
}

/// One chunk as HDF5 stores it, made by the core: read-only bytes through the buffer protocol,
/// handed to h5py's `write_direct_chunk` without a copy into a `bytes`.
#[pyclass(frozen, module = "kerassave_fast._core")]
struct StoredChunk {
    data: Vec<u8>,
}

#[pymethods]
impl StoredChunk {
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let data = &slf.get().data;
        // SAFETY: the bytes never change (frozen) and live as long as `slf`, which the view holds
        // (PyBuffer_FillInfo takes a reference); a writable view is refused with BufferError.
        let filled = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                data.as_ptr() as *mut c_void,
                data.len() as ffi::Py_ssize_t,
                1,
                flags,
            )
        };
        if filled < 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }
}

/// Runs HDF5's filter pipeline (`filters`, ids in order) over each raw chunk, in parallel with the
/// GIL released; returns what HDF5 stores for each (h5py's `write_direct_chunk` takes it).
#[pyfunction]
#[pyo3(signature = (chunks, filters, level, itemsize, threads = 0))]
fn hdf5_encode_chunks<'py>(
    py: Python<'py>,
    chunks: Vec<Bound<'py, PyAny>>,
    filters: Vec<u16>,
    level: i32,
    itemsize: usize,
    threads: usize,
) -> PyResult<Vec<Bound<'py, StoredChunk>>> {
    if !hdf5::filters::Pipeline::supported(&filters) {
        return Err(PyValueError::new_err(format!("unsupported HDF5 filters {filters:?}")));
    }
    let (buffers, spans) = tensor_spans(vec![0; chunks.len()], &chunks, false)?;
    let pipeline = hdf5::filters::Pipeline {
        filters,
        level,
        itemsize,
    };
    let encoded = py.detach(|| {
        io::run_on_pool(threads, || {
            use rayon::prelude::*;
            // SAFETY: `buffers` keeps every Py_buffer exported until this returns.
            spans
                .par_iter()
                .map(|&(_, p, n)| {
                    io::count_moved(n);
                    pipeline.encode(unsafe { bytes(p, n) })
                })
                .collect::<Vec<_>>()
        })
    })?;
    drop(buffers);
    encoded
        .into_iter()
        .map(|e| {
            Bound::new(
                py,
                StoredChunk {
                    data: e.map_err(PyValueError::new_err)?,
                },
            )
        })
        .collect()
}

/// Tensor bytes the core has written, read or compressed in this process so far (for progress bars).
#[pyfunction]
fn tensor_bytes_moved() -> u64 {
    io::tensor_bytes_moved()
}

/// The datasets of an HDF5 file readable by offset (see `hdf5::reader`), its metadata parsed
/// without libhdf5 and with the GIL released; None when the file cannot be walked here (h5py may
/// still read it); `KerasSaveError` when it is corrupted beyond what libhdf5 survives. `source` is
/// a `TensorFile` holding the HDF5 file at `start..start+length`, or the file's bytes. `pages`, a
/// dict, receives the file's pages the walk read ({index of the 4 KiB page from `start`: bytes}),
/// so h5py can be served the same metadata without reading it again. `path` names the file of
/// bytes in errors (a file's own path is named otherwise). `left_to_libhdf5`, a list, receives
/// what the walk does not account for: datasets it does not list, and the like (see `hdf5::Listing`).
#[pyfunction]
#[pyo3(signature = (source, start = 0, length = None, pages = None, path = None, left_to_libhdf5 = None))]
fn hdf5_stored_datasets(
    py: Python<'_>,
    source: &Bound<'_, PyAny>,
    start: u64,
    length: Option<u64>,
    pages: Option<&Bound<'_, PyDict>>,
    path: Option<PathBuf>,
    left_to_libhdf5: Option<&Bound<'_, PyList>>,
) -> PyResult<Option<Vec<StoredDatasetTuple>>> {
    let (source, path) = if let Ok(file) = source.cast::<TensorFile>() {
        let file = file.get();
        let len = match length {
            Some(len) => len,
            None => file.size()?.saturating_sub(start),
        };
        let source = hdf5::Source::File {
            file: Arc::clone(&file.file),
            start,
            len,
        };
        (source, file.path.clone())
    } else {
        let bytes: &[u8] = source.extract()?;
        let end = length.map_or(bytes.len() as u64, |len| start.saturating_add(len));
        let stretch = usize::try_from(start)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(s, e)| bytes.get(s..e))
            .ok_or_else(|| PyValueError::new_err("start/length outside the bytes"))?;
        let path = path.unwrap_or_else(|| PathBuf::from("<memory>"));
        (hdf5::Source::Bytes(Arc::from(stretch)), path)
    };
    let (listing, read) = py.detach(|| hdf5::list_keeping_pages(source, &path))?;
    if let Some(pages) = pages {
        for (index, block) in read {
            pages.set_item(index, PyBytes::new(py, &block))?;
        }
    }
    Ok(match listing {
        hdf5::Listing::Listed {
            datasets,
            left_to_libhdf5: left,
        } => {
            if let Some(left_to_libhdf5) = left_to_libhdf5 {
                for name in left {
                    left_to_libhdf5.append(name)?;
                }
            }
            Some(
                datasets
                    .into_iter()
                    .map(|d| (d.path, d.offset, d.shape, d.dtype, d.chunked.map(chunking_tuple)))
                    .collect(),
            )
        }
        hdf5::Listing::Unreadable(_) => None,
    })
}

/// `TensorFile.read_chunked` of an HDF5 file in memory (`data`, a compressed zip member inflated),
/// naming `path` in its errors.
#[pyfunction]
#[pyo3(signature = (data, start, datasets, path, threads = 0))]
fn hdf5_read_chunked(
    py: Python<'_>,
    data: &[u8],
    start: u64,
    datasets: Vec<ChunkedReadTuple<'_>>,
    path: PathBuf,
    threads: usize,
) -> PyResult<Vec<(u64, u64, u32)>> {
    read_chunked_from(py, data, &path, start, datasets, threads)
}

/// The chunked reads of `TensorFile.read_chunked`, from any source, with the GIL released.
fn read_chunked_from<S: hdf5::chunks::StoredBytes + ?Sized>(
    py: Python<'_>,
    source: &S,
    path: &std::path::Path,
    start: u64,
    datasets: Vec<ChunkedReadTuple<'_>>,
    threads: usize,
) -> PyResult<Vec<(u64, u64, u32)>> {
    let objects: Vec<Bound<'_, PyAny>> = datasets.iter().map(|d| d.4.clone()).collect();
    let (buffers, spans) = tensor_spans(vec![0; objects.len()], &objects, true)?;
    let plans: Vec<(String, hdf5::Chunked, Vec<u64>, usize)> = datasets
        .into_iter()
        .map(|(name, c, shape, itemsize, _)| (name, chunked_from(c), shape, itemsize))
        .collect();
    let read = py.detach(|| {
        let requests = plans
            .iter()
            .zip(&spans)
            .map(
                |((name, chunked, shape, itemsize), &(_, p, n))| hdf5::chunks::ChunkedRead {
                    name,
                    chunked,
                    shape,
                    itemsize: *itemsize,
                    // SAFETY: as in `read_tensors`: writable, exported while `buffers` lives, no two overlapping.
                    out: unsafe { bytes_mut(p, n) },
                },
            )
            .collect();
        hdf5::chunks::read_chunked(source, path, start, requests, threads)
    })?;
    drop(buffers);
    Ok(read)
}

/// A step of `hdf5_lay_out`: a group (path, "", None, attribute, False), a dataset (its group,
/// name, (numpy dtype kind, item size, shape), attribute, created), where an attribute is (name,
/// string value); or a group's attribute (path, name, (kind, items, width)), kind one of "str",
/// "bytes" (one item), "list" (of bytes), "fixed" (numpy `S{width}`), "empty".
#[derive(FromPyObject)]
enum LayoutStep<'py> {
    Node(
        String,
        String,
        Option<(char, u8, Vec<u64>)>,
        Option<(String, String)>,
        bool,
    ),
    Attribute(String, String, (String, Vec<Bound<'py, PyBytes>>, u64)),
}

/// The HDF5 file h5py would write for `steps` (see `hdf5::layout`) through its file-object driver
/// (a `.keras` member) or with `posix` libhdf5's POSIX one (a `.weights.h5` file), laid out
/// with the GIL released: (its size, the offset of each dataset with bytes in order, the bytes
/// between those datasets as (start, bytes)); None when h5py must lay it out.
#[pyfunction]
#[allow(clippy::type_complexity)]
#[pyo3(signature = (steps, posix = false))]
fn hdf5_lay_out<'py>(
    py: Python<'py>,
    steps: Vec<LayoutStep<'py>>,
    posix: bool,
) -> PyResult<Option<(u64, Vec<u64>, Vec<(u64, Bound<'py, PyBytes>)>)>> {
    use hdf5::layout::{Driver, Element, Step, Value};
    let mut planned = Vec::with_capacity(steps.len());
    for step in steps {
        planned.push(match step {
            LayoutStep::Node(path, _, None, attribute, _) => Step::Group { path, attribute },
            LayoutStep::Node(group, name, Some((kind, size, shape)), attribute, created) => {
                let Some(element) = Element::from_numpy(kind, size) else {
                    return Ok(None);
                };
                Step::Dataset {
                    group,
                    name,
                    element,
                    shape,
                    attribute,
                    created,
                }
            }
            LayoutStep::Attribute(path, name, (kind, items, width)) => {
                let items: Vec<Vec<u8>> = items.iter().map(|b| b.as_bytes().to_vec()).collect();
                let value = match kind.as_str() {
                    "str" | "bytes" => Value::Strings {
                        utf8: kind == "str",
                        scalar: true,
                        items,
                    },
                    "list" => Value::Strings {
                        utf8: false,
                        scalar: false,
                        items,
                    },
                    "fixed" => Value::Fixed { width, items },
                    "empty" => Value::Empty,
                    _ => return Err(PyValueError::new_err(format!("unknown attribute kind {kind:?}"))),
                };
                Step::Attribute { path, name, value }
            }
        });
    }
    let driver = if posix { Driver::Posix } else { Driver::FileObject };
    let Ok(layout) = py.detach(|| hdf5::layout::lay_out(&planned, driver)) else {
        return Ok(None);
    };
    let between = (layout.between.iter())
        .map(|(start, data)| (*start, PyBytes::new(py, data)))
        .collect();
    Ok(Some((layout.size, layout.tensor_offsets, between)))
}

/// `key, value = item`: any iterable of exactly two.
fn pair<'py>(item: &Bound<'py, PyAny>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let not_a_pair = || PyValueError::new_err("an item of `__dict__.items()` is not a (key, value) pair");
    let mut values = item.try_iter()?;
    let key = values.next().transpose()?.ok_or_else(not_a_pair)?; // stops where unpacking stops
    let value = values.next().transpose()?.ok_or_else(not_a_pair)?;
    match values.next().transpose()? {
        None => Ok((key, value)),
        Some(_) => Err(not_a_pair()),
    }
}

/// `keras3.state._attribute_state` (its docstring says what and why): everything a Keras 3 model's
/// saving walk can depend on, as plain attributes show it, in the order a depth-first walk of
/// `vars()` finds it. Here because a model of 1,000 layers visits ~110,000 values at every save:
/// a fifth of the Python walk's time. `kinds` caches `kind_of(value)` (0 a plain value, 1 a Keras
/// object, 2 a list, tuple or dict, 3 anything else) by class, for values whose class is their
/// type; `plain` are the plain types (a dict key of another type is recorded by identity).
#[pyfunction]
fn attribute_state<'py>(
    model: Bound<'py, PyAny>,
    kinds: Bound<'py, PyDict>,
    kind_of: Bound<'py, PyAny>,
    plain: Bound<'py, PyTuple>,
) -> PyResult<Bound<'py, PyList>> {
    use pyo3::intern;
    let py = model.py();
    let dict_type = py.get_type::<PyDict>();
    let (object_tag, container_tag) = (intern!(py, "object"), intern!(py, "container"));
    let state = PyList::empty(py);
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![model];
    while let Some(obj) = stack.pop() {
        let cls = obj.get_type();
        // A proxy (TensorFlow's `_TupleWrapper`) names a class that is not its type: never cached.
        let cached = match obj.getattr(intern!(py, "__class__"))?.is(&cls) {
            true => kinds.get_item(&cls).ok().flatten(), // a metaclass without hashing: asked each time
            false => None,
        };
        let kind: u8 = match cached {
            Some(kind) => kind.extract()?,
            None => kind_of.call1((&obj,))?.extract()?,
        };
        let id = obj.as_ptr() as usize;
        match kind {
            0 => state.append(&obj)?,
            1 => {
                state.append((object_tag, id, &cls))?; // its class too: a `__class__` reassigned
                if seen.insert(id) {
                    let attributes = obj.getattr(intern!(py, "__dict__")).map_err(|e| {
                        match e.is_instance_of::<pyo3::exceptions::PyAttributeError>(py) {
                            true => {
                                pyo3::exceptions::PyTypeError::new_err("vars() argument must have __dict__ attribute")
                            }
                            false => e, // as `vars()`: only a missing `__dict__` is its TypeError
                        }
                    })?;
                    let mut names = Vec::new();
                    let mut values = Vec::new();
                    if let Ok(dict) = attributes.cast_exact::<PyDict>() {
                        for (name, value) in dict.iter() {
                            names.push(name);
                            values.push(value);
                        }
                    } else {
                        for item in attributes.call_method0(intern!(py, "items"))?.try_iter()? {
                            let (name, value) = pair(&item?)?;
                            names.push(name);
                            values.push(value);
                        }
                    }
                    state.append(PyTuple::new(py, names)?)?;
                    stack.extend(values.into_iter().rev());
                }
            }
            2 => {
                if !seen.insert(id) {
                    state.append((container_tag, id))?;
                    continue;
                }
                let is_dict = obj.is_instance(&dict_type)?;
                let values = match is_dict {
                    true => obj.call_method0(intern!(py, "values"))?,
                    false => obj.clone(),
                };
                let values: Vec<Bound<'py, PyAny>> = values.try_iter()?.collect::<PyResult<_>>()?;
                let mut keys = Vec::new();
                if is_dict {
                    for key in obj.try_iter()? {
                        let key = key?;
                        keys.push(match key.is_instance(&plain)? {
                            true => key,
                            false => (key.as_ptr() as usize).into_pyobject(py)?.into_any(),
                        });
                    }
                }
                // Holds no object: nothing kept alive.
                state.append((container_tag, id, values.len(), PyTuple::new(py, keys)?))?;
                stack.extend(values.into_iter().rev());
            }
            _ => state.append(py.None())?, // stock's walk enters neither it nor anything in it
        }
    }
    Ok(state)
}

/// Renames each `(from, to)` in order in one call, the GIL released: no Python code of this thread
/// (a signal handler raising `KeyboardInterrupt`) runs between the renames. Returns how many were
/// renamed, stopping at the first that fails (the caller renames that one again to see why).
#[pyfunction]
fn rename_all(py: Python<'_>, pairs: Vec<(PathBuf, PathBuf)>) -> usize {
    py.detach(|| io::rename_all(&pairs))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("KerasSaveError", m.py().get_type::<KerasSaveError>())?;
    m.add("BadKerasZipFile", bad_keras_zip_file(m.py())?)?;
    m.add("ZIP64_LIMIT", zip::ZIP64_LIMIT)?;
    m.add("MAX_THREADS", io::MAX_THREADS)?;
    // tensorflow/python/trackable/base.py OBJECT_GRAPH_PROTO_KEY: ASCII
    m.add(
        "OBJECT_GRAPH_KEY",
        String::from_utf8_lossy(bundle::OBJECT_GRAPH_KEY).into_owned(),
    )?;
    m.add_class::<TensorFile>()?;
    m.add_class::<ZipWriter>()?;
    m.add_class::<ZipArchive>()?;
    m.add_class::<ZipMember>()?;
    m.add_class::<TensorBundleReader>()?;
    m.add_class::<TensorBundleWriter>()?;
    m.add_class::<StoredChunk>()?;
    m.add_function(wrap_pyfunction!(bundle_write_sharded_index, m)?)?;
    m.add_function(wrap_pyfunction!(hdf5_stored_datasets, m)?)?;
    m.add_function(wrap_pyfunction!(hdf5_encode_chunks, m)?)?;
    m.add_function(wrap_pyfunction!(hdf5_read_chunked, m)?)?;
    m.add_function(wrap_pyfunction!(hdf5_lay_out, m)?)?;
    m.add("HDF5_LAID_OUT_VERSION", hdf5::layout::HDF5_VERSION)?;
    m.add_function(wrap_pyfunction!(tensor_bytes_moved, m)?)?;
    m.add_function(wrap_pyfunction!(attribute_state, m)?)?;
    m.add_function(wrap_pyfunction!(rename_all, m)?)?;
    Ok(())
}
