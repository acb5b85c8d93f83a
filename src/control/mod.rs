//! The admin socket: how `twinblk status`, `primary`, `secondary`, `connect`… talk to a running
//! daemon. One Unix socket per node and resource, mode 0600 (whoever can write to it can promote the
//! node), one JSON object per line each way, so that an operator can debug it with
//! `socat - UNIX-CONNECT:/run/twinblk/r0-alpha.sock` and `{"cmd":"status"}`.
//!
//! A request gets one or more responses and then the daemon closes the connection; `events` keeps
//! streaming until the client goes away.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

/// Longest request line accepted: requests are tiny, so anything longer is a confused client.
const MAX_REQUEST_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// The latency breakdown of replicated writes over the last `seconds` (`status --latency`).
    Latency {
        #[serde(default = "default_latency_secs")]
        seconds: u64,
    },
    Primary {
        #[serde(default)]
        force: bool,
    },
    Secondary {
        /// Disconnect the NBD clients that have the export open first (refused otherwise).
        #[serde(default)]
        force: bool,
    },
    Connect {
        #[serde(default)]
        discard_my_data: bool,
    },
    Disconnect,
    /// This node becomes a full sync target of the peer.
    Invalidate,
    /// Compare both disks online by digest; differing blocks are marked out of sync.
    Verify,
    /// Re-read the resource file: apply what can change live, name what needs a restart.
    Adjust,
    Down {
        /// Disconnect the NBD clients that have the export open first (refused otherwise).
        #[serde(default)]
        force: bool,
    },
    Events {
        #[serde(default)]
        now: bool,
    },
}

fn default_latency_secs() -> u64 {
    10
}

/// One line from the daemon. `Status` and `Event` carry structured JSON whose schema belongs to
/// the daemon (documented in the README).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Response {
    Ok {
        message: String,
    },
    /// `code` names the refusal for programs (the CLI's retries, scripts); `message` is for
    /// people. Absent for errors without a stable name.
    Error {
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<crate::core::AdminErrorCode>,
    },
    Status {
        status: serde_json::Value,
    },
    Event {
        event: serde_json::Value,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no daemon is listening on {path}: start it with `twinblk up`")]
    NotRunning { path: PathBuf },
    #[error(
        "permission denied on the admin socket {path}: run as the daemon's user (usually root)"
    )]
    PermissionDenied { path: PathBuf },
    #[error(
        "another daemon already serves the admin socket {path}: stop it first (`twinblk down`)"
    )]
    InUse { path: PathBuf },
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {path}: the daemon sent a line this build cannot read ({detail}); are the CLI and the daemon the same version?")]
    Protocol { path: PathBuf, detail: String },
}

/// What the daemon does with a request. Responses go to `reply`; the connection closes when the
/// handler returns and drops it (or when the client disconnects, which makes sends fail).
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        request: Request,
        reply: mpsc::Sender<Response>,
    ) -> impl std::future::Future<Output = ()> + Send;
}

/// Bind the admin socket: refuses if a live daemon holds it, replaces a stale file left by a crash.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    match crate::addr::clear_stale_socket(path) {
        Ok(()) => {}
        Err(crate::addr::SocketBusy::InUse) => {
            return Err(ControlError::InUse {
                path: path.to_owned(),
            })
        }
        Err(crate::addr::SocketBusy::NotASocket) => {
            return Err(ControlError::Io {
                path: path.to_owned(),
                source: std::io::Error::other("exists and is not a socket; refusing to replace it"),
            })
        }
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Accept admin connections until the listener's task is dropped or aborted.
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = handler.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_one(stream, handler).await {
                        tracing::debug!(error = %e, "admin connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_one<H: Handler>(stream: UnixStream, handler: Arc<H>) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = TokioBufReader::new(rd);
    let mut line = String::new();
    let n = (&mut rd)
        .take(MAX_REQUEST_LINE as u64)
        .read_line(&mut line)
        .await?;
    if n == 0 {
        return Ok(());
    }
    let request: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            let resp = Response::Error {
                message: format!("cannot parse request: {e}"),
                code: None,
            };
            return write_line(&mut wr, &resp).await;
        }
    };
    let (tx, mut rx) = mpsc::channel(64);
    let work = tokio::spawn(async move { handler.handle(request, tx).await });
    while let Some(resp) = rx.recv().await {
        if write_line(&mut wr, &resp).await.is_err() {
            // The client went away (e.g. Ctrl-C on `twinblk events`): stop the handler too.
            work.abort();
            break;
        }
    }
    Ok(())
}

async fn write_line<W: AsyncWriteExt + Unpin>(wr: &mut W, resp: &Response) -> std::io::Result<()> {
    let mut buf = serde_json::to_vec(resp).map_err(std::io::Error::other)?;
    buf.push(b'\n');
    wr.write_all(&buf).await
}

/// Client side (blocking, for the CLI): send one request and hand each response to `each`, which
/// returns false to stop reading.
pub fn request(
    path: &Path,
    req: &Request,
    mut each: impl FnMut(Response) -> bool,
) -> Result<(), ControlError> {
    let stream = StdUnixStream::connect(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ControlError::NotRunning {
                path: path.to_owned(),
            }
        }
        std::io::ErrorKind::PermissionDenied => ControlError::PermissionDenied {
            path: path.to_owned(),
        },
        _ => ControlError::Io {
            path: path.to_owned(),
            source,
        },
    })?;
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let mut line = serde_json::to_vec(req).map_err(|e| io(std::io::Error::other(e)))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    for line in BufReader::new(&stream).lines() {
        let line = line.map_err(io)?;
        let resp: Response = serde_json::from_str(&line).map_err(|e| ControlError::Protocol {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        if !each(resp) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        async fn handle(&self, request: Request, reply: mpsc::Sender<Response>) {
            match request {
                Request::Events { .. } => {
                    for i in 0..3 {
                        let event = serde_json::json!({ "n": i });
                        let _ = reply.send(Response::Event { event }).await;
                    }
                }
                other => {
                    let message = format!("{other:?}");
                    let _ = reply.send(Response::Ok { message }).await;
                }
            }
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime")
    }

    #[test]
    fn request_response_and_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.sock");
        let rt = runtime();
        let listener = rt.block_on(async { bind(&path) }).expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "admin socket must be private");
        rt.spawn(serve(listener, Arc::new(Echo)));

        let mut got = Vec::new();
        request(&path, &Request::Primary { force: true }, |r| {
            got.push(r);
            true
        })
        .expect("request");
        assert_eq!(
            got,
            vec![Response::Ok {
                message: "Primary { force: true }".into()
            }]
        );

        let mut events = Vec::new();
        request(&path, &Request::Events { now: true }, |r| {
            events.push(r);
            true
        })
        .expect("events");
        assert_eq!(events.len(), 3);

        // A second daemon must not steal a live socket.
        let err = rt.block_on(async { bind(&path) }).expect_err("in use");
        assert!(matches!(err, ControlError::InUse { .. }), "{err}");
    }

    #[test]
    fn stale_socket_is_replaced_and_missing_daemon_is_explained() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.sock");
        let err = request(&path, &Request::Status, |_| true).expect_err("no daemon");
        assert!(err.to_string().contains("twinblk up"), "{err}");

        // A socket file nobody listens on, as a crashed daemon leaves it.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind stale"));
        let rt = runtime();
        rt.block_on(async { bind(&path) })
            .expect("stale socket replaced");
    }

    #[test]
    fn garbage_request_gets_an_error_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.sock");
        let rt = runtime();
        let listener = rt.block_on(async { bind(&path) }).expect("bind");
        rt.spawn(serve(listener, Arc::new(Echo)));
        let mut s = StdUnixStream::connect(&path).expect("connect");
        s.write_all(b"{\"cmd\":\"explode\"}\n").expect("write");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("read");
        let resp: Response = serde_json::from_str(&line).expect("json");
        assert!(matches!(resp, Response::Error { .. }), "{resp:?}");
    }
}
