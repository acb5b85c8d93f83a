//! systemd's readiness protocol (sd_notify), written out because it is one datagram: under
//! `Type=notify` systemd passes a Unix datagram socket in `$NOTIFY_SOCKET` (a path, or an
//! abstract name written with a leading '@') and waits for `READY=1`; `STOPPING=1` tells it a
//! stop has begun. Without the variable (not started by systemd) this does nothing.

use std::os::unix::net::UnixDatagram;

/// Send `state` (e.g. "READY=1") to `$NOTIFY_SOCKET`, if set. Failures are logged and
/// otherwise ignored: a daemon must not die because its supervisor's socket went away.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&target.to_string_lossy(), state) {
        tracing::warn!(socket = ?target, error = %e, "sd_notify {state:?} failed");
    } else {
        tracing::debug!(socket = ?target, "sd_notify {state:?}");
    }
}

/// Send one notification datagram to `target` (a path, or '@' + an abstract name).
pub fn send(target: &str, state: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = target.strip_prefix('@') {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
            return Ok(());
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            return Err(std::io::Error::other(
                "abstract socket names exist only on Linux",
            ));
        }
    }
    sock.send_to(state.as_bytes(), target)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_socket_gets_the_datagram() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).expect("bind");
        send(path.to_str().expect("utf-8 path"), "READY=1").expect("send");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_socket_gets_the_datagram() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("twinblk-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract addr");
        let rx = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        send(&format!("@{name}"), "STOPPING=1").expect("send");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn missing_socket_is_an_error_not_a_panic() {
        assert!(send("/nonexistent/twinblk/notify", "READY=1").is_err());
    }
}
