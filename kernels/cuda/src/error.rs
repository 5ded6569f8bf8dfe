use thiserror::Error;

/// Result alias of the CUDA backend.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a CUDA operation did not run.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum Error {
    /// No usable GPU here: the driver library is missing, it found no device, or the
    /// device is older than the kernels support. Tests print this reason and skip.
    #[error("no CUDA device: {0}")]
    Unavailable(String),
    /// The NVRTC library (`libnvrtc.so`) was not found, so the kernels cannot be compiled.
    #[error(
        "NVRTC not found ({0}); put the directory holding libnvrtc.so.13 on LD_LIBRARY_PATH \
         (scripts/cuda-check --env prints the exports)"
    )]
    NvrtcUnavailable(String),
    /// A kernel source failed to compile; `log` is NVRTC's log.
    #[error("NVRTC failed to compile cuda/{file} for {arch} ({options}):\n{log}")]
    Compile {
        /// The source file under `cuda/`.
        file: &'static str,
        /// The target architecture, e.g. `sm_90a`.
        arch: String,
        /// The options passed to NVRTC.
        options: String,
        /// The compiler's log.
        log: String,
    },
    /// A CUDA driver call failed (an asynchronous kernel fault shows up at the next
    /// synchronizing call).
    #[error("CUDA driver error in {context}: {error}")]
    Driver {
        /// What was being done.
        context: String,
        /// The driver's error code.
        error: cudarc::driver::DriverError,
    },
    /// The arguments were refused before anything was launched.
    #[error(transparent)]
    Invalid(#[from] tessera_core::Error),
    /// The operation needs something this device or build does not have (e.g. the `wgmma`
    /// path on a GPU that is not sm_90a).
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// Attaches a description of the failed call to a driver error.
pub(crate) trait DriverContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> DriverContext<T> for std::result::Result<T, cudarc::driver::DriverError> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|error| Error::Driver {
            context: context(),
            error,
        })
    }
}
