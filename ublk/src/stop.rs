//! Stopping a running device: a [`StopHandle`] (an eventfd others can poke) and, optionally,
//! SIGINT/SIGTERM, whose handler pokes a process-wide eventfd.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};

/// Stops a running [`crate::serve`] from any thread. Cheap to clone.
#[derive(Clone)]
pub struct StopHandle {
    efd: Arc<OwnedFd>,
}

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StopHandle(fd {})", self.efd.as_raw_fd())
    }
}

pub(crate) fn new_eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory arguments; a valid fd is owned exactly once below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by eventfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Add one to an eventfd counter. Async-signal-safe.
pub(crate) fn poke(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64. A full counter (EAGAIN) still means "readable",
    // which is all a poke needs, so the result is ignored.
    unsafe {
        libc::write(fd, (&one as *const u64).cast(), 8);
    }
}

impl StopHandle {
    pub fn new() -> std::io::Result<StopHandle> {
        Ok(StopHandle {
            efd: Arc::new(new_eventfd()?),
        })
    }

    /// Ask the device to stop; [`crate::serve`] then deletes it and returns.
    pub fn stop(&self) {
        poke(self.efd.as_raw_fd());
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }
}

static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
static SIGNAL_EFD: OnceLock<OwnedFd> = OnceLock::new();

extern "C" fn on_signal(_: libc::c_int) {
    let fd = SIGNAL_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        poke(fd);
    }
}

/// Install SIGINT/SIGTERM handlers (once per process) and return the eventfd they poke.
pub(crate) fn signal_fd() -> std::io::Result<RawFd> {
    if let Some(fd) = SIGNAL_EFD.get() {
        return Ok(fd.as_raw_fd());
    }
    let efd = new_eventfd()?;
    let fd = efd.as_raw_fd();
    if SIGNAL_EFD.set(efd).is_err() {
        // Another thread won the race; use its fd.
        return SIGNAL_EFD
            .get()
            .map(|f| f.as_raw_fd())
            .ok_or_else(|| std::io::Error::other("signal eventfd vanished"));
    }
    SIGNAL_FD.store(fd, Ordering::Relaxed);
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only does an atomic load and write(2), both async-signal-safe.
        unsafe { sigaction(sig, &action) }.map_err(std::io::Error::from)?;
    }
    Ok(fd)
}

/// Block until one of `fds` is readable (never consumes it: a stop stays visible to all).
pub(crate) fn wait_any(fds: &[RawFd]) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: pfds is a live, correctly sized array of pollfd.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if n > 0 {
            return;
        }
        let err = std::io::Error::last_os_error();
        if n < 0 && err.raw_os_error() != Some(libc::EINTR) {
            tracing::error!("poll on the ublk stop fds failed: {err}; stopping");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_handle_wakes_a_waiter_on_another_thread() {
        let h = StopHandle::new().unwrap();
        let other = StopHandle::new().unwrap();
        let fds = [other.fd(), h.fd()];
        let waiter = std::thread::spawn(move || wait_any(&fds));
        h.clone().stop();
        waiter.join().unwrap();
        // The stop stays visible: a second wait returns at once.
        wait_any(&[h.fd()]);
    }
}
