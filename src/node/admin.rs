//! The admin socket handler: turns `twinblk status/primary/secondary/connect/disconnect/down`
//! into event-loop inputs and answers with their result.

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::Input;
use crate::control::{Handler, Request, Response};
use crate::core::AdminCmd;

pub(super) struct Admin {
    pub tx: mpsc::UnboundedSender<Input>,
    /// Set by `down`: the daemon then shuts down gracefully.
    pub down: watch::Sender<bool>,
    pub resource: String,
    pub node: String,
    pub metrics: crate::metrics::Metrics,
}

fn gone() -> Response {
    Response::Error {
        message: "the daemon is shutting down".into(),
    }
}

impl Admin {
    async fn admin(&self, cmd: AdminCmd, ok: &str) -> Response {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Input::Admin { cmd, reply }).is_err() {
            return gone();
        }
        match rx.await {
            Ok(Ok(())) => Response::Ok {
                message: ok.to_owned(),
            },
            Ok(Err(message)) => Response::Error { message },
            Err(_) => gone(),
        }
    }
}

impl Admin {
    /// Stream event lines until the client goes away or the daemon stops. A client that reads
    /// slower than events happen loses lines (the broadcast is bounded so the event loop never
    /// waits) and gets a `dropped` line saying how many.
    async fn events(&self, now: bool, reply: &mpsc::Sender<Response>) {
        let (r, rx) = oneshot::channel();
        if self.tx.send(Input::Events { now, reply: r }).is_err() {
            let _ = reply.send(gone()).await;
            return;
        }
        let Ok((mut stream, exists)) = rx.await else {
            let _ = reply.send(gone()).await;
            return;
        };
        for event in exists {
            if reply.send(Response::Event { event }).await.is_err() {
                return;
            }
        }
        loop {
            let event = match stream.recv().await {
                Ok(e) => e,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    self.metrics.events_dropped.inc_by(n);
                    super::events::dropped(&self.resource, &self.node, n)
                }
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = reply.send(gone()).await;
                    return;
                }
            };
            if reply.send(Response::Event { event }).await.is_err() {
                return;
            }
        }
    }
}

impl Handler for Admin {
    async fn handle(&self, request: Request, reply: mpsc::Sender<Response>) {
        let resp = match request {
            Request::Status => {
                let (r, rx) = oneshot::channel();
                if self.tx.send(Input::Status { reply: r }).is_err() {
                    gone()
                } else {
                    match rx.await {
                        Ok(status) => Response::Status { status },
                        Err(_) => gone(),
                    }
                }
            }
            Request::Primary { force } => {
                self.admin(AdminCmd::Promote { force }, "now Primary").await
            }
            Request::Secondary => self.admin(AdminCmd::Demote, "now Secondary").await,
            Request::Connect { discard_my_data } => {
                if discard_my_data {
                    Response::Error {
                        message: "--discard-my-data is not implemented yet".into(),
                    }
                } else {
                    self.admin(AdminCmd::Connect, "connecting").await
                }
            }
            Request::Disconnect => self.admin(AdminCmd::Disconnect, "disconnected").await,
            Request::Down => {
                let _ = self.down.send(true);
                Response::Ok {
                    message: "shutting down".into(),
                }
            }
            Request::Events { now } => {
                self.events(now, &reply).await;
                return;
            }
        };
        let _ = reply.send(resp).await;
    }
}
