//! The copy engine jobs: full copy, update-img, delta create and restore, verify.
//!
//! # Building blocks others plug into
//!
//! - [`Source`]: where a job reads. [`FileSource`] (file or block device) is read through
//!   the I/O engine with many requests in flight and O_DIRECT when allowed; any other
//!   source (an NBD export) implements `read_at` and `data_extents` and works unchanged.
//! - [`ImageWriter`]: where a job writes. `buffer()` hands out an aligned pool buffer,
//!   `write(offset, buf)` queues it (all-zero 4 KiB blocks become holes: skipped on a
//!   fresh destination, punched on an existing one), `zero(offset, len)` makes a range
//!   read as zeros, `finish()` waits for everything, fsyncs and returns the byte counts
//!   and the failed extents. A producer with its own transport (`tidemark pull` reading
//!   NBD) needs only these four calls.
//! - The jobs: [`copy_image`], [`update_image`], [`verify_images`], and the delta jobs in
//!   [`delta`]. Each returns a [`JobReport`]; failed extents are collected, not fatal, so
//!   one bad sector does not stop a copy, and the caller exits non-zero listing them.
//!
//! Every job is idempotent: rerunning an interrupted copy, update-img or restore with the
//! same inputs writes the same bytes again and ends with the same image.

pub mod delta;
pub mod extents;
mod jobs;
mod source;
pub mod target;
mod writer;

use std::io;
use std::path::Path;
use std::sync::Arc;

pub use jobs::{copy_image, update_image, verify_images, JobOptions, JobReport, VerifyReport};
pub use source::{FileSource, Source};
pub use writer::{ImageWriter, WriteStats, WriterOptions, WRITE_TAG};

use crate::io::IoError;

/// Called with the number of bytes each step of a job has dealt with.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Why a copy job could not run (extent failures are reported in [`JobReport`] instead).
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{what} {path}")]
    File {
        what: &'static str,
        path: String,
        #[source]
        error: io::Error,
    },
    #[error("{0}")]
    Input(String),
    #[error("internal error in the copy engine: {0}")]
    Internal(String),
    #[error(transparent)]
    Target(#[from] target::TargetError),
}

impl CopyError {
    pub(crate) fn file(path: &Path, what: &'static str, error: io::Error) -> CopyError {
        CopyError::File {
            what,
            path: path.display().to_string(),
            error,
        }
    }
}

/// A byte range a job could not copy, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FailedExtent {
    pub offset: u64,
    pub length: u64,
    /// "reading", "writing" or "zeroing".
    pub during: &'static str,
    pub error: String,
}

impl FailedExtent {
    pub(crate) fn new(
        offset: u64,
        length: u64,
        during: &'static str,
        error: &io::Error,
    ) -> FailedExtent {
        FailedExtent {
            offset,
            length,
            during,
            error: error.to_string(),
        }
    }
}

impl std::fmt::Display for FailedExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bytes {}..{} (offset {}, length {}): {} failed: {}",
            self.offset,
            self.offset + self.length,
            self.offset,
            self.length,
            self.during,
            self.error
        )
    }
}

#[cfg(test)]
mod tests;
