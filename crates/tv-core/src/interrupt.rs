//! Interrupt requests (SIGINT, SIGTERM) as a flag the long loops poll.
//!
//! The binaries call [`install`] once; the merge checks [`requested`]
//! between segments and returns [`crate::Error::Interrupted`], so the usual
//! error path removes the temporary output.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

fn flag() -> &'static Arc<AtomicBool> {
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Turns SIGINT and SIGTERM into an interrupt request instead of an
/// immediate exit. A second signal terminates at once.
pub fn install() -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM] {
        // A second signal while the flag is set exits immediately.
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(flag()))?;
        signal_hook::flag::register(sig, Arc::clone(flag()))?;
    }
    Ok(())
}

/// Whether an interrupt was requested.
pub fn requested() -> bool {
    flag().load(Ordering::Relaxed)
}
