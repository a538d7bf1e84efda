//! A version-1 object header growing as libhdf5 1.14 grows it (`H5Oalloc.c`): each new message
//! takes the best-fitting null message, else a chunk extended in place, else a new chunk whose
//! continuation message takes a null message or the smallest movable message's place.
//!
//! Version 1 aligns every message to 8 bytes, so no chunk ever has a gap. File space comes from
//! the caller (`Grow`), which replays libhdf5's allocator.

const PREFIX: u64 = 16; // version-1 header prefix, part of chunk 0
const MESSAGE_HEADER: u64 = 8;
const CONTINUATION_SIZE: u64 = 16; // address + length
const MIN_CHUNK: u64 = 22; // H5O_MIN_SIZE
const NULL: u16 = 0;
const ATTRIBUTE: u16 = 0x0C;
const CONTINUATION: u16 = 0x10;

fn align8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

/// What a message holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Null,
    /// A message's encoded body (unpadded).
    Raw(u16, Vec<u8>),
    /// A continuation message pointing at chunk n (its address and size are read at encoding).
    Continuation(usize),
}

#[derive(Debug, Clone)]
struct Message {
    body: Body,
    chunk: usize,
    at: u64,   // offset of its 8-byte header in its chunk
    size: u64, // raw size, a multiple of 8
}

impl Message {
    fn kind(&self) -> u16 {
        match self.body {
            Body::Null => NULL,
            Body::Raw(kind, _) => kind,
            Body::Continuation(_) => CONTINUATION,
        }
    }

    fn end(&self) -> u64 {
        self.at + MESSAGE_HEADER + self.size
    }
}

/// The file space a header grows into: H5MF_try_extend and H5MF_alloc of object-header space.
pub trait Grow {
    fn try_extend(&mut self, address: u64, size: u64, extra: u64) -> bool;
    fn alloc(&mut self, size: u64) -> u64;
}

/// Why a header is left to libhdf5: a case libhdf5 calls "extremely rare" (moving every message of
/// the last chunk) is not replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreplayed;

#[derive(Debug, Clone)]
pub struct ObjectHeader {
    chunks: Vec<(u64, u64)>, // (address, size); chunk 0 starts with the prefix
    messages: Vec<Message>,  // in libhdf5's message-array order (it decides ties)
}

impl ObjectHeader {
    /// A header at `address` holding exactly `first` (libhdf5 sizes a new group's header to its messages).
    pub fn new(address: u64, kind: u16, first: Vec<u8>) -> Self {
        let size = align8(first.len() as u64);
        let message = Message {
            body: Body::Raw(kind, first),
            chunk: 0,
            at: PREFIX,
            size,
        };
        ObjectHeader {
            chunks: vec![(address, PREFIX + MESSAGE_HEADER + size)],
            messages: vec![message],
        }
    }

    /// All its chunks' bytes.
    pub fn size(&self) -> u64 {
        self.chunks.iter().map(|c| c.1).sum()
    }

    /// H5O__alloc then the message written into its place.
    pub fn append(&mut self, kind: u16, body: Vec<u8>, space: &mut impl Grow) -> Result<(), Unreplayed> {
        let size = align8(body.len() as u64);
        let index = match self.best_null(size) {
            Some(i) => i,
            None => match (0..self.chunks.len()).find_map(|c| self.extend_chunk(c, size, space)) {
                Some(i) => i,
                None => self.new_chunk(size, space)?,
            },
        };
        self.take_null(index, Body::Raw(kind, body), size);
        Ok(())
    }

    /// Replaces the body of the message holding `old` (same size: a value written after its
    /// message was made); false when no message holds it.
    #[must_use]
    pub fn rewrite(&mut self, kind: u16, old: &[u8], new: Vec<u8>) -> bool {
        for m in &mut self.messages {
            if let Body::Raw(k, body) = &mut m.body {
                if *k == kind && body.as_slice() == old && align8(new.len() as u64) == m.size {
                    *body = new;
                    return true;
                }
            }
        }
        false
    }

    /// H5O__alloc_find_best_null: the smallest null message of at least `size` bytes, exact fits
    /// and earlier chunks winning ties as libhdf5 decides them (an exact fit after a larger one
    /// wins only from an earlier chunk).
    fn best_null(&self, size: u64) -> Option<usize> {
        let mut found: Option<usize> = None;
        for (i, m) in self.messages.iter().enumerate() {
            if m.kind() != NULL || m.size < size {
                continue;
            }
            let Some(f) = found else {
                found = Some(i);
                continue;
            };
            let best = &self.messages[f];
            if m.size == size {
                if m.chunk < best.chunk {
                    found = Some(i);
                    if m.chunk == 0 {
                        break;
                    }
                }
            } else if m.size < best.size || (m.size == best.size && m.chunk < best.chunk) {
                found = Some(i);
            }
        }
        found
    }

    /// H5O__alloc_extend_chunk: grows chunk `c` in place if the file space after it is free.
    fn extend_chunk(&mut self, c: usize, size: u64, space: &mut impl Grow) -> Option<usize> {
        let (address, chunk_size) = self.chunks[c];
        let last_null = (self.messages.iter()).position(|m| m.chunk == c && m.kind() == NULL && m.end() == chunk_size);
        let delta = match last_null {
            Some(i) => size - self.messages[i].size.min(size),
            None => size + MESSAGE_HEADER,
        };
        let delta = align8(delta);
        if !space.try_extend(address, chunk_size, delta) {
            return None;
        }
        let index = match last_null {
            Some(i) => {
                self.messages[i].size += delta;
                i
            }
            None => {
                self.messages.push(Message {
                    body: Body::Null,
                    chunk: c,
                    at: chunk_size,
                    size: delta - MESSAGE_HEADER,
                });
                self.messages.len() - 1
            }
        };
        self.chunks[c].1 += delta;
        Some(index)
    }

    /// H5O__alloc_new_chunk and H5O__alloc_chunk: a new chunk for a message of `size` bytes, a
    /// continuation message in a null message, or in the place of a message moved to the new chunk.
    fn new_chunk(&mut self, size: u64, space: &mut impl Grow) -> Result<usize, Unreplayed> {
        let mut need = size;
        let mut null = self.best_null(CONTINUATION_SIZE);
        let moved = match null {
            Some(_) => None,
            None => {
                let Some((m, after)) = self.best_to_move() else {
                    return Err(Unreplayed);
                };
                need += MESSAGE_HEADER + self.messages[m].size;
                Some((m, after))
            }
        };
        let chunk_size = MIN_CHUNK.max(need + MESSAGE_HEADER);
        let address = space.alloc(chunk_size);
        let chunk = self.chunks.len();
        self.chunks.push((address, chunk_size));
        let mut used = 0;
        if let Some((m, after)) = moved {
            // the moved message's old place (and a null message right after it) becomes one null message
            let old = self.messages[m].clone();
            let mut freed = old.size;
            self.messages.push(Message {
                body: Body::Null,
                chunk: old.chunk,
                at: old.at,
                size: 0,
            });
            let mut index = self.messages.len() - 1;
            self.messages[m].chunk = chunk;
            self.messages[m].at = 0;
            used = MESSAGE_HEADER + old.size;
            if let Some(a) = after {
                freed += MESSAGE_HEADER + self.messages[a].size;
                self.messages.remove(a);
                index -= 1;
            }
            self.messages[index].size = freed;
            null = Some(index);
        }
        self.messages.push(Message {
            body: Body::Null,
            chunk,
            at: used,
            size: chunk_size - used - MESSAGE_HEADER,
        });
        let rest = self.messages.len() - 1;
        let null = null.expect("a null message for the continuation");
        self.take_null(null, Body::Continuation(chunk), CONTINUATION_SIZE);
        Ok(rest)
    }

    /// H5O__alloc_find_best_nonnull: the message whose place (with a null message right after it)
    /// best holds a continuation message, non-attributes first; None when libhdf5 would move a
    /// whole chunk's messages.
    fn best_to_move(&self) -> Option<(usize, Option<usize>)> {
        let mut found: Option<(usize, Option<usize>, u64)> = None;
        for (i, m) in self.messages.iter().enumerate() {
            if m.kind() == CONTINUATION {
                continue;
            }
            let end = m.end();
            let after = if end == self.chunks[m.chunk].1 {
                None
            } else {
                (self.messages.iter()).position(|n| n.kind() == NULL && n.chunk == m.chunk && n.at == end)
            };
            let total = m.size + after.map_or(0, |a| MESSAGE_HEADER + self.messages[a].size);
            if total < CONTINUATION_SIZE {
                continue;
            }
            let better = match found {
                None => true,
                Some((f, _, best_total)) => {
                    let f = &self.messages[f];
                    if f.kind() == ATTRIBUTE && m.kind() != ATTRIBUTE {
                        true
                    } else {
                        total < best_total || (total == best_total && m.chunk < f.chunk)
                    }
                }
            };
            if better {
                found = Some((i, after, total));
            }
        }
        found.map(|(i, after, _)| (i, after))
    }

    /// H5O__alloc_null: `body` takes null message `index`, whose rest (if any) stays a null message.
    fn take_null(&mut self, index: usize, body: Body, size: u64) {
        let null = self.messages[index].clone();
        if null.size > size {
            self.messages.push(Message {
                body: Body::Null,
                chunk: null.chunk,
                at: null.at + MESSAGE_HEADER + size,
                size: null.size - size - MESSAGE_HEADER,
            });
        }
        let m = &mut self.messages[index];
        m.body = body;
        m.size = size;
    }

    /// The chunks' bytes, (address, bytes), chunk 0 with the prefix.
    pub fn pieces(&self, out: &mut Vec<(u64, Vec<u8>)>) {
        let mut images: Vec<Vec<u8>> = self.chunks.iter().map(|c| vec![0u8; c.1 as usize]).collect();
        let prefix = &mut images[0];
        prefix[0] = 1;
        prefix[2..4].copy_from_slice(&(self.messages.len() as u16).to_le_bytes());
        prefix[4..8].copy_from_slice(&1u32.to_le_bytes());
        prefix[8..12].copy_from_slice(&((self.chunks[0].1 - PREFIX) as u32).to_le_bytes());
        for m in &self.messages {
            let image = &mut images[m.chunk];
            let at = m.at as usize;
            image[at..at + 2].copy_from_slice(&m.kind().to_le_bytes());
            image[at + 2..at + 4].copy_from_slice(&(m.size as u16).to_le_bytes());
            let body = &mut image[at + 8..at + 8 + m.size as usize];
            match &m.body {
                Body::Null => {}
                Body::Raw(_, raw) => body[..raw.len()].copy_from_slice(raw),
                Body::Continuation(c) => {
                    body[..8].copy_from_slice(&self.chunks[*c].0.to_le_bytes());
                    body[8..16].copy_from_slice(&self.chunks[*c].1.to_le_bytes());
                }
            }
        }
        for (chunk, image) in self.chunks.iter().zip(images) {
            out.push((chunk.0, image));
        }
    }
}
