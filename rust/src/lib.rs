//! gpt-oss-cpu: OpenAI's gpt-oss models on a CPU.
//!
//! [`model`] holds the forward pass as SPEC.md describes it; [`kernels`] the fast matrix kernels
//! behind one interface; [`checkpoint`] and [`weights`] map the safetensors files without copying.

pub mod bandwidth;
pub mod checkpoint;
pub mod config;
pub mod dense_q8;
pub mod error;
pub mod kernels;
pub mod kv_cache;
pub mod model;
#[cfg(feature = "python")]
mod python;
pub mod sampling;
pub mod session;
pub mod weights;

pub use config::Config;
pub use error::{Error, Result};
pub use model::Model;
pub use session::Session;
