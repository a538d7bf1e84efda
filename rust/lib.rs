//! Python bindings of the Rust core: the only file that knows pyo3. Each wrapper turns Python
//! buffers into byte slices once, then releases the GIL while the bytes move.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyTuple, PyType};

pub mod error;
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
                Some(code) => PyOSError::new_err((code, message, path)),
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

/// An open file whose tensors are written or read at planned offsets.
#[pyclass(frozen, module = "kerassave_fast._core")]
struct TensorFile {
    file: Arc<File>,
    path: String,
}

#[pymethods]
impl TensorFile {
    /// Opens an existing file, read-only or for reading and writing.
    #[new]
    #[pyo3(signature = (path, writable = false))]
    fn new(py: Python<'_>, path: PathBuf, writable: bool) -> PyResult<Self> {
        let shown = path.display().to_string();
        let file = py
            .detach(|| File::options().read(true).write(writable).open(&path))
            .map_err(|e| Error::io(&shown, "open", e))?;
        Ok(TensorFile {
            file: Arc::new(file),
            path: shown,
        })
    }

    #[getter]
    fn path(&self) -> &str {
        &self.path
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

    /// Reserves a member whose data others write; returns the file offset where the data starts.
    fn begin_stored(&mut self, name: &str, date_time: DateTime, external_attr: u32, size_hint: u64) -> PyResult<u64> {
        let when = zip::DosDateTime::from_parts(date_time)?;
        Ok(self.inner.begin_stored(name, when, external_attr, size_hint)?)
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
    path: String,
    members: Vec<zip::Member>,
}

impl ZipArchive {
    fn member(&self, index: usize) -> PyResult<&zip::Member> {
        self.members
            .get(index)
            .ok_or_else(|| PyValueError::new_err(format!("no member {index} in {}", self.path)))
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

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("KerasSaveError", m.py().get_type::<KerasSaveError>())?;
    m.add("BadKerasZipFile", bad_keras_zip_file(m.py())?)?;
    m.add("ZIP64_LIMIT", zip::ZIP64_LIMIT)?;
    m.add_class::<TensorFile>()?;
    m.add_class::<ZipWriter>()?;
    m.add_class::<ZipArchive>()?;
    m.add_class::<ZipMember>()?;
    Ok(())
}
