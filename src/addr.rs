//! Listen addresses: `unix:/path` (a bare path also means unix) or `tcp:HOST:PORT`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    /// `HOST:PORT`, as given (resolved when binding). IPv6 hosts go in brackets: `[::1]:10809`.
    Tcp(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    #[error("empty address: use unix:/path/to.sock or tcp:HOST:PORT")]
    Empty,
    #[error("{0:?}: a tcp address needs HOST:PORT, e.g. tcp:127.0.0.1:10809")]
    TcpNoPort(String),
    #[error("{0:?}: bad port (0..65535)")]
    BadPort(String),
}

impl FromStr for ListenAddr {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<ListenAddr, AddrError> {
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| AddrError::TcpNoPort(s.to_owned()))?;
            if host.is_empty() {
                return Err(AddrError::TcpNoPort(s.to_owned()));
            }
            port.parse::<u16>()
                .map_err(|_| AddrError::BadPort(s.to_owned()))?;
            return Ok(ListenAddr::Tcp(rest.to_owned()));
        }
        let path = s.strip_prefix("unix:").unwrap_or(s);
        if path.is_empty() {
            return Err(AddrError::Empty);
        }
        Ok(ListenAddr::Unix(PathBuf::from(path)))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(hp) => write!(f, "tcp:{hp}"),
        }
    }
}

/// Why a unix socket path cannot be taken over.
#[derive(Debug, PartialEq, Eq)]
pub enum SocketBusy {
    /// A live server answers on it.
    InUse,
    /// The path exists and is not a socket: never delete someone's file.
    NotASocket,
}

/// Prepare `path` for binding a unix socket: remove a socket file left by a dead server, refuse
/// when a live one answers there or when the path is something else.
pub fn clear_stale_socket(path: &std::path::Path) -> Result<(), SocketBusy> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(SocketBusy::NotASocket);
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(SocketBusy::InUse);
    }
    tracing::info!("removing stale socket {}", path.display());
    let _ = std::fs::remove_file(path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            "unix:/run/x.sock".parse(),
            Ok(ListenAddr::Unix("/run/x.sock".into()))
        );
        assert_eq!("/tmp/y".parse(), Ok(ListenAddr::Unix("/tmp/y".into())));
        assert_eq!(
            "tcp:127.0.0.1:10809".parse(),
            Ok(ListenAddr::Tcp("127.0.0.1:10809".into()))
        );
        assert_eq!("tcp:[::1]:0".parse(), Ok(ListenAddr::Tcp("[::1]:0".into())));
        assert!("tcp:host".parse::<ListenAddr>().is_err());
        assert!("tcp:host:99999".parse::<ListenAddr>().is_err());
        assert!("tcp::80".parse::<ListenAddr>().is_err());
        assert!("".parse::<ListenAddr>().is_err());
        assert!("unix:".parse::<ListenAddr>().is_err());
        let a: ListenAddr = "tcp:localhost:1".parse().unwrap();
        assert_eq!(a.to_string(), "tcp:localhost:1");
    }
}
