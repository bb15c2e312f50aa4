//! Errors of the engine. Every failure a user can cause through the Python API is one of these,
//! not a panic: the bindings map each variant to an exception class of the same name.

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

/// An empty buffer with room for `len` values, or an error naming `what` when it cannot be
/// allocated (an out-of-memory abort cannot be caught, so large buffers sized by user input come
/// from here).
pub fn try_with_capacity<T>(len: usize, what: &str) -> Result<Vec<T>> {
    let mut buffer = Vec::new();
    buffer.try_reserve_exact(len).map_err(|_| {
        Error::Input(format!(
            "{what}: cannot allocate {:.1} GB",
            len as f64 * std::mem::size_of::<T>() as f64 / 1e9
        ))
    })?;
    Ok(buffer)
}

/// As [`try_with_capacity`], filled with `len` zeros.
pub fn try_zeroed<T: Clone + Default>(len: usize, what: &str) -> Result<Vec<T>> {
    let mut buffer = try_with_capacity(len, what)?;
    buffer.resize(len, T::default());
    Ok(buffer)
}

impl Error {
    pub fn io(path: &std::path::Path, err: &std::io::Error) -> Self {
        Error::Checkpoint(format!("{}: {err}", path.display()))
    }

    pub fn checkpoint(path: &std::path::Path, msg: impl std::fmt::Display) -> Self {
        Error::Checkpoint(format!("{}: {msg}", path.display()))
    }
}

/// The one of `all` whose `name_of` is `name`, or an error listing every name: for options given
/// by name (instruction set, precision, weight and cache formats).
pub fn by_name<T: Copy>(
    all: &[T],
    name_of: impl Fn(T) -> &'static str,
    name: &str,
) -> std::result::Result<T, String> {
    all.iter()
        .copied()
        .find(|&v| name_of(v) == name)
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|&v| name_of(v)).collect();
            format!("expected one of {}, found {name:?}", names.join(", "))
        })
}
