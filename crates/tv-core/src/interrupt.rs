//! Interrupt requests (SIGINT, SIGTERM) as a flag the long loops poll.
//!
//! The binaries call [`install`] once; the merge checks [`requested`]
//! between segments and returns [`crate::Error::Interrupted`], so the usual
//! error path removes the temporary output. [`signal`] says which signal
//! arrived, so the binaries can exit with 128 + its number, as shells do.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
static SIGNAL: OnceLock<Arc<AtomicUsize>> = OnceLock::new();

fn flag() -> &'static Arc<AtomicBool> {
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

fn last_signal() -> &'static Arc<AtomicUsize> {
    SIGNAL.get_or_init(|| Arc::new(AtomicUsize::new(0)))
}

/// Turns SIGINT and SIGTERM into an interrupt request instead of an
/// immediate exit. A second signal terminates at once (exit status 128 +
/// the second signal's number).
pub fn install() -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM] {
        // A second signal while the flag is set exits immediately.
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(flag()))?;
        // Recorded before the flag is raised (handlers run in registration
        // order), so whoever sees the flag also sees the signal.
        signal_hook::flag::register_usize(sig, Arc::clone(last_signal()), sig as usize)?;
        signal_hook::flag::register(sig, Arc::clone(flag()))?;
    }
    Ok(())
}

/// Whether an interrupt was requested.
pub fn requested() -> bool {
    flag().load(Ordering::Relaxed)
}

/// The number of the signal that requested the interrupt, if one did.
pub fn signal() -> Option<i32> {
    match last_signal().load(Ordering::SeqCst) {
        0 => None,
        n => i32::try_from(n).ok(),
    }
}

/// The exit status for an interrupted run: 128 + the signal's number (130
/// for SIGINT, 143 for SIGTERM); 130 when no signal was recorded.
pub fn exit_status() -> u8 {
    signal()
        .and_then(|s| u8::try_from(128 + s).ok())
        .unwrap_or(130)
}
