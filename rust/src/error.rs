//! Errors of the engine. Every failure a user can cause is one of these, never a panic: the Python
//! bindings map each variant to an exception class of the same name.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A checkpoint file or tensor is missing, truncated, corrupt, misshaped or mistyped.
    #[error("{0}")]
    Checkpoint(String),
    /// `config.json` is missing, unreadable or holds a value the engine cannot use.
    #[error("{0}")]
    Config(String),
    /// A call got bad arguments (token ids out of range, empty input, bad sizes).
    #[error("{0}")]
    Input(String),
    /// Appending would exceed the session's context.
    #[error("{0}")]
    ContextOverflow(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: &std::path::Path, err: &std::io::Error) -> Self {
        Error::Checkpoint(format!("{}: {err}", path.display()))
    }

    pub fn checkpoint(path: &std::path::Path, msg: impl std::fmt::Display) -> Self {
        Error::Checkpoint(format!("{}: {msg}", path.display()))
    }
}
