//! The error type of the `tessera` crate: model loading, configuration and the forward passes.
//!
//! Every error names what it is about (the file, the tensor, the `config.json` key), so a
//! user can tell a missing weight from a corrupt file from an unsupported model.

use std::path::PathBuf;

/// Result alias of the `tessera` crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why loading or running a model failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A kernel refused its arguments (a shape the model produced that a kernel rejects).
    #[error("kernel: {0}")]
    Kernel(#[from] tessera_core::Error),
    /// A file could not be opened, mapped or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not what it claims to be (a safetensors header, an index, a JSON config).
    #[error("{}: {what}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("tensor {name:?} is missing from the checkpoint")]
    MissingTensor {
        /// The tensor's name as Hugging Face writes it.
        name: String,
    },
    /// A tensor has the wrong shape or an element type that cannot be used.
    #[error("tensor {name:?}: {what}")]
    BadTensor {
        /// The tensor's name.
        name: String,
        /// Expected vs found.
        what: String,
    },
    /// A `config.json` key is missing, of the wrong type or out of range.
    #[error("config.json key {key:?}: {what}")]
    Config {
        /// The key.
        key: String,
        /// What is wrong with it.
        what: String,
    },
    /// A model type, activation or option this crate does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Any other invalid input (token ids out of range, an empty batch, …).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The CUDA backend failed: no device, a kernel that did not compile, a driver error, or
    /// arguments a CUDA kernel refused.
    #[cfg(feature = "cuda")]
    #[error("cuda: {0}")]
    Cuda(#[from] tessera_cuda::Error),
}
