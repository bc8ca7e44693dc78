//! Block buffers handed back for reuse: a block is read into a buffer, parsed, and the
//! buffer returned here for the next read. A megabyte buffer freed to the allocator goes
//! back to the OS, and the kernel zeroes the fresh pages of the next one: a tenth of a
//! rescan's CPU before this pool.

use std::sync::Mutex;

/// Buffers kept at most (about one parse chunk of large blocks).
const KEPT: usize = 32;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer with room for `len` bytes, reused when one is free.
pub fn take(len: usize) -> Vec<u8> {
    let reused = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
    match reused {
        Some(mut buf) => {
            buf.clear();
            buf.reserve(len);
            buf
        }
        None => Vec::with_capacity(len),
    }
}

/// Returns `buf` for reuse (dropped when enough are kept).
pub fn give(buf: Vec<u8>) {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < KEPT {
        pool.push(buf);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_returned_buffer_is_reused_empty_with_its_room() {
        let mut b = super::take(1 << 20);
        b.extend_from_slice(&[7; 1000]);
        let ptr = b.as_ptr();
        super::give(b);
        let again = super::take(10);
        assert!(again.is_empty() && again.capacity() >= 1 << 20);
        // Another test may have taken it first; when it is ours, it is the same memory.
        if again.as_ptr() == ptr {
            assert_eq!(again.capacity(), 1 << 20);
        }
    }
}
