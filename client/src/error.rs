//! The agent's error type; gRPC statuses from the node are mapped back into it.

use modelcache_proto::reference::{PathError, ReferenceError};
use tonic::Code;

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    InvalidReference(#[from] ReferenceError),

    #[error("cannot reach a cache node at {addrs}: {detail}")]
    Unreachable { addrs: String, detail: String },

    /// The node answered with an error; `code` is the gRPC code it sent.
    #[error("{message}")]
    Node { code: Code, message: String },

    #[error("refusing model {reference}: {source}")]
    UnsafePath {
        reference: String,
        source: PathError,
    },

    #[error("node sent a bad stream for {reference}: {detail}")]
    Protocol { reference: String, detail: String },

    #[error("{reference}: {path} at byte {offset} failed its BLAKE3 check; nothing of it was kept")]
    Integrity {
        reference: String,
        path: String,
        offset: u64,
    },

    #[error(
        "no space left on the device holding {dir} while {context}; the partial download was removed"
    )]
    NoSpace { dir: String, context: String },

    #[error("{reference} is not in {dir}; run `cache-agent prefetch {reference}` first")]
    NotPresent { reference: String, dir: String },

    #[error("{reference}: {detail}")]
    Corrupt { reference: String, detail: String },

    #[error("{reference}: {detail}; use `cache-agent get {reference}` for the directory")]
    WeightFile { reference: String, detail: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl AgentError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The gRPC code behind a node error, if any.
    pub fn code(&self) -> Option<Code> {
        match self {
            AgentError::Node { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<tonic::Status> for AgentError {
    fn from(status: tonic::Status) -> Self {
        AgentError::Node {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}
