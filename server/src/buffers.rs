//! Reused buffers for the chunks a large origin read assembles.
//!
//! A response body arrives in pieces far smaller than a chunk, so each chunk is copied
//! together into a buffer of its own. A fresh 2 MiB buffer per chunk costs more than the
//! copy: the allocator hands memory of that size back to the kernel when it is freed and
//! takes it again on the next chunk, so every page of every chunk is faulted in and zeroed
//! anew. Buffers here go back to a small free list when the last holder of the chunk lets
//! go (the memory tier evicts it, the disk tier has it and the send is done), and the next
//! chunk reuses them with their pages in place.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use modelcache_proto::CHUNK_SIZE;

/// Whole-chunk buffers kept for reuse.
pub struct ChunkBuffers {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl ChunkBuffers {
    /// A free list that keeps at most `keep` idle buffers (`keep` × 2 MiB of memory at
    /// most while nothing is read).
    pub fn new(keep: usize) -> Arc<Self> {
        Arc::new(Self {
            free: Mutex::new(Vec::new()),
            keep,
        })
    }

    /// An empty buffer for a chunk of `len` bytes: a reused one for a whole chunk, an
    /// exact fresh one for a file's shorter last chunk (so a small file does not pin 2 MiB
    /// in the memory tier).
    pub fn take(self: &Arc<Self>, len: usize) -> ChunkBuffer {
        let reused = (len as u64 == CHUNK_SIZE)
            .then(|| self.list().pop())
            .flatten();
        ChunkBuffer {
            bytes: reused.unwrap_or_else(|| Vec::with_capacity(len)),
            home: self.clone(),
        }
    }

    /// Idle buffers now.
    pub fn idle(&self) -> usize {
        self.list().len()
    }

    fn give_back(&self, mut bytes: Vec<u8>) {
        if bytes.capacity() as u64 != CHUNK_SIZE {
            return;
        }
        bytes.clear();
        let mut free = self.list();
        if free.len() < self.keep {
            free.push(bytes);
        }
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.free.lock().expect("buffer list lock poisoned")
    }
}

/// A chunk being assembled; frozen into `Bytes` that return the buffer when dropped.
pub struct ChunkBuffer {
    bytes: Vec<u8>,
    home: Arc<ChunkBuffers>,
}

impl ChunkBuffer {
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn extend_from_slice(&mut self, piece: &[u8]) {
        self.bytes.extend_from_slice(piece);
    }

    /// The chunk as `Bytes`, without a copy; the buffer goes back to its free list when the
    /// last clone is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for ChunkBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for ChunkBuffer {
    fn drop(&mut self) {
        self.home.give_back(std::mem::take(&mut self.bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WHOLE: usize = CHUNK_SIZE as usize;

    #[test]
    fn a_whole_chunk_buffer_is_reused_once_its_bytes_are_dropped() {
        let buffers = ChunkBuffers::new(2);
        let mut first = buffers.take(WHOLE);
        first.extend_from_slice(&vec![7u8; WHOLE]);
        let address = first.as_ref().as_ptr();
        let bytes = first.freeze();
        let clone = bytes.clone();
        assert_eq!(clone.len(), WHOLE);
        assert!(clone.iter().all(|&b| b == 7));
        drop(bytes);
        // A clone still holds it.
        assert_eq!(buffers.idle(), 0);
        drop(clone);
        assert_eq!(buffers.idle(), 1);
        let second = buffers.take(WHOLE);
        assert!(second.is_empty());
        assert_eq!(second.as_ref().as_ptr(), address);
        assert_eq!(buffers.idle(), 0);
    }

    #[test]
    fn short_chunks_get_exact_buffers_and_the_free_list_is_bounded() {
        let buffers = ChunkBuffers::new(1);
        let mut short = buffers.take(100);
        short.extend_from_slice(&[1; 100]);
        let short = short.freeze();
        assert_eq!(&short[..], &[1; 100][..]);
        drop(short);
        assert_eq!(buffers.idle(), 0, "a short buffer is not kept");
        let whole: Vec<_> = (0..3).map(|_| buffers.take(WHOLE).freeze()).collect();
        drop(whole);
        assert_eq!(buffers.idle(), 1);
    }
}
