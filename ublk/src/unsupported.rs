//! Non-Linux stand-ins: the API exists, serving does not.

use crate::{BlockTarget, UblkError, UblkOptions};
use std::sync::Arc;

/// Stops a running [`serve`]; inert off Linux.
#[derive(Debug, Clone, Default)]
pub struct StopHandle;

impl StopHandle {
    pub fn new() -> std::io::Result<StopHandle> {
        Ok(StopHandle)
    }
    pub fn stop(&self) {}
}

pub fn serve<T: BlockTarget>(
    _target: Arc<T>,
    _opts: &UblkOptions,
    _ready: impl FnOnce(&str),
) -> Result<(), UblkError> {
    Err(UblkError::Unsupported)
}

pub fn delete(_id: i32) -> Result<(), UblkError> {
    Err(UblkError::Unsupported)
}
