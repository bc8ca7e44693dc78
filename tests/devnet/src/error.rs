//! Errors starting or running a node.

use std::path::PathBuf;

/// Why a node failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Binding or running the RPC server failed.
    #[error("RPC server on {addr}: {source}")]
    Rpc {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A ZMQ socket could not be set up.
    #[error("ZMQ {endpoint}: {source}")]
    Zmq {
        /// The endpoint.
        endpoint: String,
        /// The ZMQ error.
        source: zmq::Error,
    },
    /// A stored block file does not hold what this node wrote.
    #[error("block file {path} is corrupt: {reason}")]
    CorruptBlockFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A stored block does not connect to the chain.
    #[error("stored block {hash} is invalid: {reason}")]
    InvalidStoredBlock {
        /// The block hash.
        hash: String,
        /// What is wrong.
        reason: String,
    },
    /// The node's thread could not be started or ended abnormally.
    #[error("node thread: {0}")]
    Thread(String),
}

/// A result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Attaches the path to an I/O error.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
