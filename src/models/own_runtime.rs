//! `async` model: not built yet; its issue replaces this file.

use crate::server::{Listeners, Protocol, ServeError, Shutdown};

/// Whether this model has landed.
pub const IS_BUILT: bool = false;

/// Placeholder until the model lands.
///
/// # Errors
///
/// Always [`ServeError::NotBuilt`].
pub fn run(
    _listeners: Listeners,
    _protocol: Protocol,
    _shutdown: Shutdown,
    _threads: Option<usize>,
) -> Result<(), ServeError> {
    Err(ServeError::NotBuilt { model: "async" })
}
