//! The zip container, written the way Python's `zipfile` writes stock Keras files (PKWARE APPNOTE
//! 6.3.x, sections 4.3.7 local header, 4.3.12 central directory, 4.3.14-16 end records, 4.5.3 ZIP64
//! extra field), and read the way `zipfile` reads them. We write our own because a member's bytes
//! and CRC come from the parallel tensor path, which no zip library lets us supply.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Python's `zipfile.ZIP64_LIMIT`: past it sizes and offsets move into ZIP64 fields.
pub const ZIP64_LIMIT: u64 = (1 << 31) - 1;
const FILECOUNT_LIMIT: usize = 0xFFFF;

pub const STORED: u16 = 0;
pub const DEFLATED: u16 = 8;

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const LOCATOR_SIG: u32 = 0x0706_4b50;

const LOCAL_HEADER_LEN: u64 = 30;
/// Android zipalign's extra field: a u16 alignment, then zeros (readers skip unknown local fields).
const ALIGNMENT_FIELD: u16 = 0xD935;
const ALIGNMENT_FIELD_MIN: u64 = 6;
pub const MAX_ALIGNMENT: u64 = 4096;
const CENTRAL_HEADER_LEN: usize = 46;
const EOCD_LEN: u64 = 22;
const EOCD64_LEN: u64 = 56;
const LOCATOR_LEN: u64 = 20;
const MAX_COMMENT: u64 = 0xFFFF;

const DEFAULT_VERSION: u8 = 20;
const ZIP64_VERSION: u8 = 45;
const UNIX: u8 = 3;
const FLAG_ENCRYPTED: u16 = 0x1;
const FLAG_COMPRESSED_PATCH: u16 = 0x20;
const FLAG_STRONG_ENCRYPTION: u16 = 0x40;
const FLAG_UTF8: u16 = 0x800;

/// Stock Keras' guard against decompression bombs (keras/src/saving/saving_lib.py, CWE-409).
pub const BOMB_FLOOR_BYTES: u64 = 1 << 32;
pub const BOMB_MAX_EXPANSION: u64 = 100;

/// A member's modification time in MS-DOS form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DosDateTime {
    pub time: u16,
    pub date: u16,
}

impl DosDateTime {
    /// From (year, month, day, hour, minute, second), as `zipfile.ZipInfo.date_time`.
    pub fn from_parts(parts: (u16, u8, u8, u8, u8, u8)) -> Result<Self> {
        let (year, month, day, hour, minute, second) = parts;
        if !(1980..=2107).contains(&year) || month > 12 || day > 31 || hour > 23 || minute > 59 || second > 61 {
            return Err(Error::Argument(format!(
                "zip date_time {parts:?} is outside 1980..2107 or invalid"
            )));
        }
        Ok(DosDateTime {
            time: ((hour as u16) << 11) | ((minute as u16) << 5) | ((second as u16) / 2),
            date: ((year - 1980) << 9) | ((month as u16) << 5) | day as u16,
        })
    }

    pub fn to_parts(self) -> (u16, u8, u8, u8, u8, u8) {
        let d = self.date;
        let t = self.time;
        (
            (d >> 9) + 1980,
            (d >> 5 & 0xF) as u8,
            (d & 0x1F) as u8,
            (t >> 11) as u8,
            (t >> 5 & 0x3F) as u8,
            ((t & 0x1F) * 2) as u8,
        )
    }
}

/// One member as the central directory describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The name's bytes as stored: UTF-8 when `flags` has bit 11, else code page 437.
    pub name: Vec<u8>,
    pub flags: u16,
    pub method: u16,
    pub modified: DosDateTime,
    pub crc32: u32,
    pub compressed_size: u64,
    pub size: u64,
    pub header_offset: u64,
    pub external_attr: u32,
    /// Whether the local header carries a ZIP64 extra field (which also raises the versions to 4.5).
    pub zip64_local: bool,
    /// Bytes of the padding extra field in the local header (0: none), which aligns the member's data
    /// to `data_alignment`.
    pub local_padding: u16,
    pub data_alignment: u16,
}

impl Member {
    fn new(name: &str, modified: DosDateTime, external_attr: u32, header_offset: u64) -> Self {
        Member {
            name: name.as_bytes().to_vec(),
            flags: if name.is_ascii() { 0 } else { FLAG_UTF8 },
            method: STORED,
            modified,
            crc32: 0,
            compressed_size: 0,
            size: 0,
            header_offset,
            external_attr,
            zip64_local: false,
            local_padding: 0,
            data_alignment: 1,
        }
    }

    fn local_header_len(&self) -> u64 {
        LOCAL_HEADER_LEN + self.name.len() as u64 + if self.zip64_local { 20 } else { 0 } + self.local_padding as u64
    }

    /// Pads the local header with an extra field so that the member's data starts at a multiple of
    /// `alignment` (a power of two): Android's zipalign field (0xD935: the alignment, then zeros).
    fn align_data(&mut self, alignment: u64) {
        if alignment > 1 {
            let unpadded = self.header_offset + self.local_header_len();
            let mut padding = (alignment - unpadded % alignment) % alignment;
            while padding < ALIGNMENT_FIELD_MIN {
                padding += alignment;
            }
            self.local_padding = padding as u16;
            self.data_alignment = alignment as u16;
        }
    }
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// `zipfile.ZipInfo.FileHeader(zip64)`.
fn local_header(m: &Member) -> Vec<u8> {
    let mut extra = Vec::new();
    let (csize, size, version) = if m.zip64_local {
        put16(&mut extra, 1);
        put16(&mut extra, 16);
        put64(&mut extra, m.size);
        put64(&mut extra, m.compressed_size);
        (u32::MAX, u32::MAX, ZIP64_VERSION)
    } else {
        (m.compressed_size as u32, m.size as u32, DEFAULT_VERSION)
    };
    if m.local_padding > 0 {
        let body = m.local_padding - 4;
        put16(&mut extra, ALIGNMENT_FIELD);
        put16(&mut extra, body);
        put16(&mut extra, m.data_alignment);
        extra.resize(extra.len() + body as usize - 2, 0);
    }
    let mut out = Vec::with_capacity(m.local_header_len() as usize);
    put32(&mut out, LOCAL_SIG);
    out.push(version);
    out.push(0);
    put16(&mut out, m.flags);
    put16(&mut out, m.method);
    put16(&mut out, m.modified.time);
    put16(&mut out, m.modified.date);
    put32(&mut out, m.crc32);
    put32(&mut out, csize);
    put32(&mut out, size);
    put16(&mut out, m.name.len() as u16);
    put16(&mut out, extra.len() as u16);
    out.extend_from_slice(&m.name);
    out.extend_from_slice(&extra);
    out
}

/// One record of `zipfile.ZipFile._write_end_record`'s central directory.
fn central_header(m: &Member, limit: u64, out: &mut Vec<u8>) {
    let mut zip64_fields = Vec::new();
    let (csize, size) = if m.size > limit || m.compressed_size > limit {
        zip64_fields.extend([m.size, m.compressed_size]);
        (u32::MAX, u32::MAX)
    } else {
        (m.compressed_size as u32, m.size as u32)
    };
    let offset = if m.header_offset > limit {
        zip64_fields.push(m.header_offset);
        u32::MAX
    } else {
        m.header_offset as u32
    };
    let mut extra = Vec::new();
    if !zip64_fields.is_empty() {
        put16(&mut extra, 1);
        put16(&mut extra, 8 * zip64_fields.len() as u16);
        zip64_fields.iter().for_each(|&v| put64(&mut extra, v));
    }
    let version = if m.zip64_local || !zip64_fields.is_empty() {
        ZIP64_VERSION
    } else {
        DEFAULT_VERSION
    };
    put32(out, CENTRAL_SIG);
    out.extend_from_slice(&[version, UNIX, version, 0]);
    put16(out, m.flags);
    put16(out, m.method);
    put16(out, m.modified.time);
    put16(out, m.modified.date);
    put32(out, m.crc32);
    put32(out, csize);
    put32(out, size);
    put16(out, m.name.len() as u16);
    put16(out, extra.len() as u16);
    put16(out, 0); // comment length
    put16(out, 0); // disk number start
    put16(out, 0); // internal attributes
    put32(out, m.external_attr);
    put32(out, offset);
    out.extend_from_slice(&m.name);
    out.extend_from_slice(&extra);
}

/// Writes a zip member by member, each STORED. A member's data may be written by others (the
/// tensor path) between `begin_stored` and `end_stored`; the writer only frames it.
#[derive(Debug)]
pub struct ZipWriter {
    path: PathBuf,
    limit: u64,
    end: u64,
    members: Vec<Member>,
    open: Option<Member>,
}

impl ZipWriter {
    pub fn new(path: &Path) -> Self {
        Self::with_zip64_limit(path, ZIP64_LIMIT)
    }

    /// A writer that switches to ZIP64 past `limit` instead of Python's 2 GiB (tests use small limits).
    pub fn with_zip64_limit(path: &Path, limit: u64) -> Self {
        ZipWriter {
            path: path.to_owned(),
            limit,
            end: 0,
            members: Vec::new(),
            open: None,
        }
    }

    fn write_at(&self, file: &File, bytes: &[u8], offset: u64) -> Result<()> {
        file.write_all_at(bytes, offset)
            .map_err(|e| Error::io(&self.path, "write", e))
    }

    /// A new member at the end of the archive; its name must fit the 16-bit length of a zip header
    /// (`zipfile` fails on longer ones too, with a `struct.error`).
    fn new_member(&self, name: &str, modified: DosDateTime, external_attr: u32) -> Result<Member> {
        if name.len() > u16::MAX as usize {
            return Err(Error::Argument(format!(
                "{}: zip member name of {} bytes is longer than the {} bytes a zip header can hold",
                self.path.display(),
                name.len(),
                u16::MAX
            )));
        }
        Ok(Member::new(name, modified, external_attr, self.end))
    }

    fn check_idle(&self, what: &str) -> Result<()> {
        match &self.open {
            Some(m) => Err(Error::Argument(format!(
                "{}: cannot {what} while member '{}' is open",
                self.path.display(),
                String::from_utf8_lossy(&m.name)
            ))),
            None => Ok(()),
        }
    }

    /// Like `ZipFile._open_to_write`: a member whose size is known up front gets ZIP64 fields in
    /// its local header when `size * 1.05` passes the limit.
    fn needs_zip64_local(&self, size: u64) -> bool {
        size as f64 * 1.05 > self.limit as f64
    }

    /// `ZipFile.writestr(name, data)` for a STORED member.
    pub fn add_stored(
        &mut self,
        file: &File,
        name: &str,
        modified: DosDateTime,
        external_attr: u32,
        data: &[u8],
    ) -> Result<()> {
        self.check_idle("add a member")?;
        let mut m = self.new_member(name, modified, external_attr)?;
        m.zip64_local = self.needs_zip64_local(data.len() as u64);
        m.crc32 = crc32fast::hash(data);
        m.size = data.len() as u64;
        m.compressed_size = m.size;
        let header = local_header(&m);
        self.write_at(file, &header, self.end)?;
        self.write_at(file, data, self.end + header.len() as u64)?;
        self.end += header.len() as u64 + m.size;
        self.members.push(m);
        Ok(())
    }

    /// Reserves a STORED member's local header and returns the file offset where its data starts,
    /// a multiple of `alignment` (a power of two; 1: no padding, as `zipfile`).
    /// `size_hint` must not be less than the final size where that decides ZIP64.
    pub fn begin_stored(
        &mut self,
        name: &str,
        modified: DosDateTime,
        external_attr: u32,
        size_hint: u64,
        alignment: u64,
    ) -> Result<u64> {
        self.check_idle("begin a member")?;
        let m = self.stored_member(name, modified, external_attr, size_hint, alignment)?;
        let data_offset = self.end + m.local_header_len();
        self.open = Some(m);
        Ok(data_offset)
    }

    /// Where `begin_stored` with these arguments would start the member's data, reserving nothing:
    /// lets its data be written before the size that decides ZIP64 is known (checked when it is).
    pub fn data_start(&self, name: &str, size_hint: u64, alignment: u64) -> Result<u64> {
        self.check_idle("plan a member")?;
        let m = self.stored_member(name, DosDateTime::default(), 0, size_hint, alignment)?;
        Ok(self.end + m.local_header_len())
    }

    fn stored_member(
        &self,
        name: &str,
        modified: DosDateTime,
        external_attr: u32,
        size_hint: u64,
        alignment: u64,
    ) -> Result<Member> {
        if !alignment.is_power_of_two() || alignment > MAX_ALIGNMENT {
            return Err(Error::Argument(format!(
                "{}: alignment {alignment} is not a power of two up to {MAX_ALIGNMENT}",
                self.path.display()
            )));
        }
        let mut m = self.new_member(name, modified, external_attr)?;
        m.zip64_local = self.needs_zip64_local(size_hint);
        m.align_data(alignment);
        Ok(m)
    }

    /// Closes the open member: its data (already in the file) has `size` bytes and CRC-32 `crc32`.
    pub fn end_stored(&mut self, file: &File, size: u64, crc32: u32) -> Result<()> {
        let mut m = self
            .open
            .take()
            .ok_or_else(|| Error::Argument(format!("{}: no member is open", self.path.display())))?;
        if !m.zip64_local && size > self.limit {
            return Err(Error::Argument(format!(
                "{}: member '{}' has {size} bytes, more than its size hint allowed without ZIP64",
                self.path.display(),
                String::from_utf8_lossy(&m.name)
            )));
        }
        m.size = size;
        m.compressed_size = size;
        m.crc32 = crc32;
        self.write_at(file, &local_header(&m), m.header_offset)?;
        self.end = m.header_offset + m.local_header_len() + size;
        self.members.push(m);
        Ok(())
    }

    /// Writes the central directory and end records (ZIP64 ones when needed); returns the file size.
    pub fn finish(&mut self, file: &File) -> Result<u64> {
        self.check_idle("finish")?;
        let start = self.end;
        let mut out = Vec::new();
        for m in &self.members {
            central_header(m, self.limit, &mut out);
        }
        let cd_size = out.len() as u64;
        let count = self.members.len();
        let (mut eocd_count, mut eocd_size, mut eocd_offset) = (count as u64, cd_size, start);
        if count > FILECOUNT_LIMIT || start > self.limit || cd_size > self.limit {
            let zip64_eocd_at = start + cd_size;
            put32(&mut out, EOCD64_SIG);
            put64(&mut out, 44);
            out.extend_from_slice(&[ZIP64_VERSION, 0, ZIP64_VERSION, 0]);
            put32(&mut out, 0);
            put32(&mut out, 0);
            put64(&mut out, count as u64);
            put64(&mut out, count as u64);
            put64(&mut out, cd_size);
            put64(&mut out, start);
            put32(&mut out, LOCATOR_SIG);
            put32(&mut out, 0);
            put64(&mut out, zip64_eocd_at);
            put32(&mut out, 1);
            eocd_count = eocd_count.min(0xFFFF);
            eocd_size = eocd_size.min(0xFFFF_FFFF);
            eocd_offset = eocd_offset.min(0xFFFF_FFFF);
        }
        put32(&mut out, EOCD_SIG);
        put16(&mut out, 0);
        put16(&mut out, 0);
        put16(&mut out, eocd_count as u16);
        put16(&mut out, eocd_count as u16);
        put32(&mut out, eocd_size as u32);
        put32(&mut out, eocd_offset as u32);
        put16(&mut out, 0); // archive comment length
        self.write_at(file, &out, start)?;
        let total = start + out.len() as u64;
        file.set_len(total).map_err(|e| Error::io(&self.path, "truncate", e))?;
        self.end = total;
        Ok(total)
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads exactly `len` bytes at `offset`, or says the file is truncated there.
fn pread(file: &File, path: &Path, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    let file_len = file.metadata().map_err(|e| Error::io(path, "stat", e))?.len();
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(Error::zip(
            path,
            format!("truncated {what}: {len} bytes at offset {offset} pass the end of the {file_len}-byte file"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| Error::io(path, "read", e))?;
    Ok(buf)
}

/// Finds the end-of-central-directory record like `zipfile._EndRecData`; returns its offset and bytes.
fn find_eocd(file: &File, path: &Path, file_len: u64) -> Result<(u64, Vec<u8>)> {
    if file_len < EOCD_LEN {
        return Err(Error::zip(
            path,
            "not a zip file: too short for an end-of-central-directory record",
        ));
    }
    let sig = EOCD_SIG.to_le_bytes();
    // No archive comment (as every Keras file): the record is the last 22 bytes, its comment
    // length zero. Read those alone first, as `zipfile` does, not 64 KiB of the last tensor.
    let record = pread(file, path, file_len - EOCD_LEN, EOCD_LEN, "end of file")?;
    if record[..4] == sig && record[EOCD_LEN as usize - 2..] == [0, 0] {
        return Ok((file_len - EOCD_LEN, record));
    }
    let tail_len = file_len.min(EOCD_LEN + MAX_COMMENT);
    let tail_start = file_len - tail_len;
    let tail = pread(file, path, tail_start, tail_len, "end of file")?;
    let last = tail.len() - EOCD_LEN as usize;
    match (0..=last).rev().find(|&i| tail[i..i + 4] == sig) {
        Some(i) => Ok((tail_start + i as u64, tail[i..i + EOCD_LEN as usize].to_vec())),
        None => Err(Error::zip(path, "not a zip file: no end-of-central-directory record")),
    }
}

/// Parses the central directory like `zipfile.ZipFile._RealGetContents` (data prepended to the
/// archive is allowed, as there). Member names are returned raw; nothing here trusts the file.
pub fn read_directory(file: &File, path: &Path) -> Result<Vec<Member>> {
    let file_len = file.metadata().map_err(|e| Error::io(path, "stat", e))?.len();
    let (eocd_at, eocd) = find_eocd(file, path, file_len)?;
    let mut cd_size = u32_at(&eocd, 12) as u64;
    let mut cd_offset = u32_at(&eocd, 16) as u64;
    let mut records_len = 0u64;

    if eocd_at >= LOCATOR_LEN {
        let locator = pread(file, path, eocd_at - LOCATOR_LEN, LOCATOR_LEN, "ZIP64 locator")?;
        if u32_at(&locator, 0) == LOCATOR_SIG {
            if u32_at(&locator, 4) != 0 || u32_at(&locator, 16) > 1 {
                return Err(Error::zip(path, "zip files that span multiple disks are not supported"));
            }
            if eocd_at >= LOCATOR_LEN + EOCD64_LEN {
                let rec = pread(
                    file,
                    path,
                    eocd_at - LOCATOR_LEN - EOCD64_LEN,
                    EOCD64_LEN,
                    "ZIP64 end record",
                )?;
                if u32_at(&rec, 0) == EOCD64_SIG {
                    cd_size = u64_at(&rec, 40);
                    cd_offset = u64_at(&rec, 48);
                    records_len = LOCATOR_LEN + EOCD64_LEN;
                }
            }
        }
    }

    // Bytes prepended to the archive shift every recorded offset by `concat`.
    let concat = (eocd_at as i128) - (cd_size as i128) - (cd_offset as i128) - (records_len as i128);
    let start = cd_offset as i128 + concat;
    if concat < 0 || start < 0 {
        return Err(Error::zip(path, "bad offset for the central directory"));
    }
    let (start, concat) = (start as u64, concat as u64);
    let cd = pread(file, path, start, cd_size, "central directory")?;

    let mut members = Vec::new();
    let mut at = 0usize;
    while at < cd.len() {
        let fixed = cd
            .get(at..at + CENTRAL_HEADER_LEN)
            .ok_or_else(|| Error::zip(path, "truncated central directory"))?;
        if u32_at(fixed, 0) != CENTRAL_SIG {
            return Err(Error::zip(path, "bad magic number for central directory"));
        }
        let (name_len, extra_len, comment_len) = (
            u16_at(fixed, 28) as usize,
            u16_at(fixed, 30) as usize,
            u16_at(fixed, 32) as usize,
        );
        let var_end = at + CENTRAL_HEADER_LEN + name_len + extra_len + comment_len;
        let var = cd
            .get(at + CENTRAL_HEADER_LEN..var_end)
            .ok_or_else(|| Error::zip(path, "truncated central directory"))?;
        let mut m = Member {
            name: var[..name_len].to_vec(),
            flags: u16_at(fixed, 8),
            method: u16_at(fixed, 10),
            modified: DosDateTime {
                time: u16_at(fixed, 12),
                date: u16_at(fixed, 14),
            },
            crc32: u32_at(fixed, 16),
            compressed_size: u32_at(fixed, 20) as u64,
            size: u32_at(fixed, 24) as u64,
            header_offset: u32_at(fixed, 42) as u64,
            external_attr: u32_at(fixed, 38),
            zip64_local: false, // the local header's framing is the writer's: not in the directory
            local_padding: 0,
            data_alignment: 1,
        };
        apply_zip64_extra(&mut m, &var[name_len..name_len + extra_len], path)?;
        m.header_offset = m
            .header_offset
            .checked_add(concat)
            .ok_or_else(|| Error::zip(path, "bad member header offset"))?;
        members.push(m);
        at = var_end;
    }
    Ok(members)
}

/// `zipfile.ZipInfo._decodeExtra`: 32-bit fields set to 0xFFFFFFFF take their value from the ZIP64 field.
fn apply_zip64_extra(m: &mut Member, mut extra: &[u8], path: &Path) -> Result<()> {
    let name = String::from_utf8_lossy(&m.name).into_owned();
    while extra.len() >= 4 {
        let (kind, len) = (u16_at(extra, 0), u16_at(extra, 2) as usize);
        let body = extra
            .get(4..4 + len)
            .ok_or_else(|| Error::zip(path, format!("corrupt extra field {kind:04x} of member '{name}'")))?;
        if kind == 1 {
            let mut values = body
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
            let mut take = |field: &str| {
                values.next().ok_or_else(|| {
                    Error::zip(
                        path,
                        format!("corrupt zip64 extra field of member '{name}': {field} not found"),
                    )
                })
            };
            if m.size == 0xFFFF_FFFF {
                m.size = take("file size")?;
            }
            if m.compressed_size == 0xFFFF_FFFF {
                m.compressed_size = take("compress size")?;
            }
            if m.header_offset == 0xFFFF_FFFF {
                m.header_offset = take("header offset")?;
            }
        }
        extra = &extra[4 + len..];
    }
    Ok(())
}

/// Checks a member's local header like `ZipFile.open` and returns where its data starts; the data
/// must lie inside the file.
pub fn data_offset(file: &File, path: &Path, m: &Member) -> Result<u64> {
    let name = String::from_utf8_lossy(&m.name);
    if m.flags & (FLAG_ENCRYPTED | FLAG_STRONG_ENCRYPTION) != 0 {
        return Err(Error::zip(path, format!("member '{name}' is encrypted")));
    }
    if m.flags & FLAG_COMPRESSED_PATCH != 0 {
        return Err(Error::zip(path, format!("member '{name}' is compressed patched data")));
    }
    let header = pread(file, path, m.header_offset, LOCAL_HEADER_LEN, "local file header")?;
    if u32_at(&header, 0) != LOCAL_SIG {
        return Err(Error::zip(
            path,
            format!("bad magic number for the file header of member '{name}'"),
        ));
    }
    let (name_len, extra_len) = (u16_at(&header, 26) as u64, u16_at(&header, 28) as u64);
    let local_name = pread(
        file,
        path,
        m.header_offset + LOCAL_HEADER_LEN,
        name_len,
        "local file name",
    )?;
    if local_name != m.name {
        return Err(Error::zip(
            path,
            format!(
                "file name in directory '{name}' and header '{}' differ",
                String::from_utf8_lossy(&local_name)
            ),
        ));
    }
    let start = m.header_offset + LOCAL_HEADER_LEN + name_len + extra_len;
    let file_len = file.metadata().map_err(|e| Error::io(path, "stat", e))?.len();
    if start.checked_add(m.compressed_size).is_none_or(|end| end > file_len) {
        return Err(Error::zip(
            path,
            format!(
                "file is truncated: member '{name}' needs {} bytes at offset {start}",
                m.compressed_size
            ),
        ));
    }
    Ok(start)
}

/// Stock Keras' `_reject_zip_bomb`: refuses a member declaring far more bytes than it stores.
pub fn check_not_bomb(path: &Path, m: &Member) -> Result<()> {
    if m.size > BOMB_FLOOR_BYTES && m.size > BOMB_MAX_EXPANSION.saturating_mul(m.compressed_size) {
        return Err(Error::zip(
            path,
            format!(
                "Not allowed: ZIP member '{}' declares {} bytes but only {} are stored on disk; refusing to load a potential decompression bomb",
                String::from_utf8_lossy(&m.name),
                m.size,
                m.compressed_size
            ),
        ));
    }
    if m.method == STORED && m.size != m.compressed_size {
        return Err(Error::zip(
            path,
            format!(
                "STORED member '{}' has size {} but stores {} bytes",
                String::from_utf8_lossy(&m.name),
                m.size,
                m.compressed_size
            ),
        ));
    }
    Ok(())
}

/// Reads a whole (small) member into memory, inflating DEFLATED ones, and checks its size and CRC.
pub fn read_member(file: &File, path: &Path, m: &Member) -> Result<Vec<u8>> {
    check_not_bomb(path, m)?;
    let name = String::from_utf8_lossy(&m.name).into_owned();
    let start = data_offset(file, path, m)?;
    let stored = pread(file, path, start, m.compressed_size, "member data")?;
    let data = match m.method {
        STORED => stored,
        DEFLATED => {
            // Grow with the real output rather than trusting the declared size; one byte more reveals a lie.
            let mut out = Vec::new();
            flate2::read::DeflateDecoder::new(&stored[..])
                .take(m.size.saturating_add(1))
                .read_to_end(&mut out)
                .map_err(|e| Error::zip(path, format!("member '{name}' is not valid deflate data: {e}")))?;
            out
        }
        other => {
            return Err(Error::zip(
                path,
                format!("member '{name}' uses unsupported compression method {other}"),
            ))
        }
    };
    if data.len() as u64 != m.size {
        return Err(Error::zip(
            path,
            format!(
                "member '{name}' holds {} bytes, the directory says {}",
                data.len(),
                m.size
            ),
        ));
    }
    if crc32fast::hash(&data) != m.crc32 {
        return Err(Error::zip(path, format!("Bad CRC-32 for file '{name}'")));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn open_rw(dir: &tempfile::TempDir, name: &str) -> File {
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join(name))
            .unwrap()
    }

    fn when() -> DosDateTime {
        DosDateTime::from_parts((2026, 11, 25, 17, 30, 42)).unwrap()
    }

    /// Writes metadata, a framed member filled from outside, and a small member.
    fn sample(file: &File, limit: u64, big: &[u8]) -> ZipWriter {
        let mut w = ZipWriter::with_zip64_limit(Path::new("t.zip"), limit);
        w.add_stored(file, "metadata.json", when(), 0o600 << 16, b"{\"a\": 1}")
            .unwrap();
        let at = w
            .begin_stored("model.weights.h5", when(), 0o600 << 16, big.len() as u64, 1)
            .unwrap();
        file.write_all_at(big, at).unwrap();
        w.end_stored(file, big.len() as u64, crc32fast::hash(big)).unwrap();
        w.add_stored(file, "assets/vocab.txt", when(), 0o100644 << 16, b"x")
            .unwrap();
        w.finish(file).unwrap();
        w
    }

    #[test]
    fn written_directory_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = open_rw(&dir, "a.zip");
        let big: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let w = sample(&file, ZIP64_LIMIT, &big);
        let members = read_directory(&file, Path::new("a.zip")).unwrap();
        assert_eq!(members, w.members());
        assert_eq!(read_member(&file, Path::new("a.zip"), &members[1]).unwrap(), big);
        assert_eq!(
            read_member(&file, Path::new("a.zip"), &members[0]).unwrap(),
            b"{\"a\": 1}"
        );
        assert_eq!(members[0].modified.to_parts(), (2026, 11, 25, 17, 30, 42));
    }

    #[test]
    fn lowered_limit_uses_zip64_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let file = open_rw(&dir, "b.zip");
        let big = vec![7u8; 300];
        let w = sample(&file, 64, &big);
        assert!(w.members()[1].zip64_local);
        let members = read_directory(&file, Path::new("b.zip")).unwrap();
        // The directory cannot tell which local headers had ZIP64 fields.
        let written: Vec<Member> = w
            .members()
            .iter()
            .map(|m| Member {
                zip64_local: false,
                ..m.clone()
            })
            .collect();
        assert_eq!(members, written);
        assert!(
            members[2].header_offset > 64,
            "offset past the limit went through the ZIP64 field"
        );
        assert_eq!(read_member(&file, Path::new("b.zip"), &members[2]).unwrap(), b"x");
    }

    #[test]
    fn corrupt_crc_and_truncation_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = open_rw(&dir, "c.zip");
        let big = vec![1u8; 100];
        sample(&file, ZIP64_LIMIT, &big);
        let members = read_directory(&file, Path::new("c.zip")).unwrap();
        let at = data_offset(&file, Path::new("c.zip"), &members[1]).unwrap();
        file.write_all_at(&[2], at + 50).unwrap();
        let err = read_member(&file, Path::new("c.zip"), &members[1]).unwrap_err();
        assert!(
            err.to_string().contains("Bad CRC-32 for file 'model.weights.h5'"),
            "{err}"
        );
        file.set_len(at + 10).unwrap();
        assert!(read_directory(&file, Path::new("c.zip")).is_err());
    }

    #[test]
    fn deflated_members_inflate_and_lies_are_caught() {
        use flate2::write::DeflateEncoder;
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let file = open_rw(&dir, "d.zip");
        let payload = b"hello hello hello hello".repeat(50);
        let mut enc = DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&payload).unwrap();
        let packed = enc.finish().unwrap();
        let mut w = ZipWriter::new(Path::new("d.zip"));
        w.add_stored(&file, "config.json", when(), 0, &packed).unwrap();
        w.finish(&file).unwrap();
        let mut m = read_directory(&file, Path::new("d.zip")).unwrap().remove(0);
        m.method = DEFLATED;
        m.size = payload.len() as u64;
        m.crc32 = crc32fast::hash(&payload);
        assert_eq!(read_member(&file, Path::new("d.zip"), &m).unwrap(), payload);
        m.size -= 1;
        assert!(read_member(&file, Path::new("d.zip"), &m).is_err());
        m.size = BOMB_FLOOR_BYTES + 1;
        assert!(read_member(&file, Path::new("d.zip"), &m)
            .unwrap_err()
            .to_string()
            .contains("decompression bomb"));
    }

    #[test]
    fn aligned_members_start_at_multiples_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = open_rw(&dir, "al.zip");
        for alignment in [1u64, 2, 64, 4096] {
            for (limit, name) in [(ZIP64_LIMIT, "w.h5"), (10, "a-longer-member-name.h5")] {
                let mut w = ZipWriter::with_zip64_limit(Path::new("al.zip"), limit);
                w.add_stored(&file, "config.json", when(), 0, b"{}").unwrap();
                let big = vec![7u8; 300];
                let planned = w.data_start(name, 300, alignment).unwrap();
                let at = w.begin_stored(name, when(), 0, 300, alignment).unwrap();
                assert_eq!(planned, at, "data_start reserves nothing and agrees with begin_stored");
                assert!(w.data_start(name, 300, alignment).is_err(), "a member is open");
                assert_eq!(at % alignment, 0, "alignment {alignment}, limit {limit}");
                file.write_all_at(&big, at).unwrap();
                w.end_stored(&file, 300, crc32fast::hash(&big)).unwrap();
                w.finish(&file).unwrap();
                let members = read_directory(&file, Path::new("al.zip")).unwrap();
                assert_eq!(data_offset(&file, Path::new("al.zip"), &members[1]).unwrap(), at);
                assert_eq!(read_member(&file, Path::new("al.zip"), &members[1]).unwrap(), big);
            }
        }
        let mut w = ZipWriter::new(Path::new("al.zip"));
        assert!(w.begin_stored("x", when(), 0, 1, 3).is_err());
        assert!(w.begin_stored("x", when(), 0, 1, 8192).is_err());
    }

    #[test]
    fn names_longer_than_a_header_holds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = open_rw(&dir, "n.zip");
        let mut w = ZipWriter::new(Path::new("n.zip"));
        let long = "a".repeat(u16::MAX as usize + 1);
        let err = w.add_stored(&file, &long, when(), 0, b"x").unwrap_err();
        assert!(err.to_string().contains("longer than the 65535 bytes"), "{err}");
        assert!(w.begin_stored(&long, when(), 0, 1, 1).is_err());
        w.add_stored(&file, &long[1..], when(), 0, b"x").unwrap();
        w.finish(&file).unwrap();
        assert_eq!(
            read_directory(&file, Path::new("n.zip")).unwrap()[0].name.len(),
            u16::MAX as usize
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Any byte flip or truncation yields an error or a directory, never a panic.
        #[test]
        fn malformed_archives_never_panic(flips in proptest::collection::vec((0usize..400, any::<u8>()), 1..6), cut in 0usize..450) {
            let dir = tempfile::tempdir().unwrap();
            let file = open_rw(&dir, "m.zip");
            sample(&file, 64, &[3u8; 120]);
            let len = file.metadata().unwrap().len() as usize;
            for (at, byte) in flips {
                file.write_all_at(&[byte], (at % len) as u64).unwrap();
            }
            file.set_len(cut.min(len) as u64).unwrap();
            if let Ok(members) = read_directory(&file, Path::new("m.zip")) {
                for m in &members {
                    let _ = read_member(&file, Path::new("m.zip"), m);
                }
            }
        }
    }
}
