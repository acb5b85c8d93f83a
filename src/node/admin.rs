//! The admin socket handler: turns `twinblk status/primary/secondary/connect/disconnect/down`
//! into event-loop inputs and answers with their result.

use tokio::sync::{mpsc, oneshot, watch};

use super::Input;
use crate::control::{Handler, Request, Response};
use crate::core::AdminCmd;

pub(super) struct Admin {
    pub tx: mpsc::UnboundedSender<Input>,
    /// Set by `down`: the daemon then shuts down gracefully.
    pub down: watch::Sender<bool>,
    /// `/dev/ublkbN` once `frontend = "ublk"` created it, for `status`.
    pub ublk_device: std::sync::Arc<std::sync::OnceLock<String>>,
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

impl Handler for Admin {
    async fn handle(&self, request: Request, reply: mpsc::Sender<Response>) {
        let resp = match request {
            Request::Status => {
                let (r, rx) = oneshot::channel();
                if self.tx.send(Input::Status { reply: r }).is_err() {
                    gone()
                } else {
                    match rx.await {
                        Ok(mut status) => {
                            if let Some(o) = status.as_object_mut() {
                                o.insert(
                                    "ublk_device".into(),
                                    self.ublk_device.get().cloned().into(),
                                );
                            }
                            Response::Status { status }
                        }
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
            Request::Events { .. } => Response::Error {
                message: "the events stream is not implemented yet; use `twinblk status`".into(),
            },
        };
        let _ = reply.send(resp).await;
    }
}
