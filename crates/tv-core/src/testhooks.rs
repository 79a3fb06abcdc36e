//! Failure injection for the end-to-end tests, compiled into debug builds
//! only (release builds ignore these variables):
//!
//! - `TV_TEST_FAIL_WRITES_AFTER=N`: output writes fail with "no space left
//!   on device" once N bytes have been written, as on a full disk.
//! - `TV_TEST_SEGMENT_DELAY_MS=N`: sleep N ms before each merge segment, so
//!   a test can interrupt a merge in flight.

#[cfg(debug_assertions)]
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(debug_assertions)]
static WRITTEN: AtomicU64 = AtomicU64::new(0);

#[cfg(debug_assertions)]
fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

/// Accounts for `len` more output bytes; fails like a full disk past the
/// injected limit.
pub fn before_write(len: usize) -> std::io::Result<()> {
    #[cfg(debug_assertions)]
    if let Some(limit) = env_u64("TV_TEST_FAIL_WRITES_AFTER") {
        let total = WRITTEN.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
        if total > limit {
            return Err(std::io::Error::from_raw_os_error(28));
        }
    }
    let _ = len;
    Ok(())
}

/// Sleeps before a merge segment when a delay is injected.
pub fn before_segment() {
    #[cfg(debug_assertions)]
    if let Some(ms) = env_u64("TV_TEST_SEGMENT_DELAY_MS") {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
