//! The agent's error type. A node's gRPC status comes back as a variant a caller can act
//! on (`NotFound`, `Invalid`, `Unavailable`, `Aborted`, `FailedPrecondition`, …), with the
//! node's message, so library users need not match on gRPC codes.

use modelcache_proto::reference::{PathError, ReferenceError};
use tonic::Code;

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    InvalidReference(#[from] ReferenceError),

    #[error("cannot reach a cache node at {addrs}: {detail}")]
    Unreachable { addrs: String, detail: String },

    /// No such model, file or variant on the node (`NOT_FOUND`).
    #[error("{message}")]
    NotFound { message: String },

    /// The node refused the request as malformed: a bad reference, an unknown or
    /// inapplicable variant, an offset past a file's end (`INVALID_ARGUMENT`,
    /// `OUT_OF_RANGE`).
    #[error("{message}")]
    Invalid { message: String },

    /// The node, or its origin, cannot serve now; retrying later or on another node may
    /// work (`UNAVAILABLE`).
    #[error("{message}")]
    Unavailable { message: String },

    /// The model changed while it was being fetched; fetching again gets the new revision
    /// (`ABORTED`).
    #[error("{message}")]
    Aborted { message: String },

    /// The model cannot be served as asked until something changes: a file that cannot
    /// be parsed, unsafe paths, the origin refusing the node's credentials
    /// (`FAILED_PRECONDITION`).
    #[error("{message}")]
    FailedPrecondition { message: String },

    /// The node sent nothing for `seconds` in the middle of a stream; what arrived is kept
    /// and the next run (on this node or another) resumes from it.
    #[error(
        "node {node} sent nothing for {seconds} s in the middle of {reference}; what arrived \
         is kept: run again to resume (another node is tried first when several are given)"
    )]
    Stalled {
        node: String,
        reference: String,
        seconds: u64,
    },

    /// The node refused the caller's credentials (`UNAUTHENTICATED`, `PERMISSION_DENIED`).
    #[error("{message}")]
    Denied { code: Code, message: String },

    /// Any other error the node reported; `code` is the gRPC code it sent.
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

    #[error(
        "{dir} was written by a newer cache-agent (directory format {found}; this one reads \
         up to {supported}): use that version, or give this one another --dir"
    )]
    Incompatible {
        dir: String,
        found: u32,
        supported: u32,
    },

    #[error("{reference} is not in {dir}; run `cache-agent prefetch {reference}` first")]
    NotPresent { reference: String, dir: String },

    #[error("{reference}: {detail}")]
    Corrupt { reference: String, detail: String },

    #[error("{reference}: {detail}; use `cache-agent get {reference}` for the directory")]
    WeightFile { reference: String, detail: String },

    /// Another process holds the model's lock (it is fetching it into the same `DIR`).
    #[error("{reference}: {detail}")]
    Busy { reference: String, detail: String },

    /// A setting the agent cannot use (a token file that holds no token).
    #[error("{message}")]
    Config { message: String },

    /// The daemon cannot start or serve (its socket, its listener).
    #[error("{message}")]
    Daemon { message: String },

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

    /// The gRPC code behind an error the node reported, if any (for diagnostics; match
    /// on the variants to act).
    pub fn code(&self) -> Option<Code> {
        match self {
            AgentError::NotFound { .. } => Some(Code::NotFound),
            AgentError::Invalid { .. } => Some(Code::InvalidArgument),
            AgentError::Unavailable { .. } => Some(Code::Unavailable),
            AgentError::Aborted { .. } => Some(Code::Aborted),
            AgentError::FailedPrecondition { .. } => Some(Code::FailedPrecondition),
            AgentError::Denied { code, .. } | AgentError::Node { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Whether a status says the connection itself broke (a node that died or was cut off),
/// rather than the node answering with an error.
fn connection_broke(status: &tonic::Status) -> bool {
    let text = status.message();
    matches!(
        status.code(),
        Code::Unknown | Code::Internal | Code::Unavailable
    ) && [
        "h2 protocol error",
        "error reading a body from connection",
        "connection reset",
        "broken pipe",
    ]
    .iter()
    .any(|needle| text.to_ascii_lowercase().contains(needle))
}

/// Whether a call failed because the node's bytes were not HTTP/2 frames: a TLS record
/// (the alert a TLS node answers a plaintext client with) read as a frame is far too large.
fn not_http2(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.to_string().contains("frame with invalid size") {
            return true;
        }
        source = e.source();
    }
    false
}

impl From<tonic::Status> for AgentError {
    fn from(status: tonic::Status) -> Self {
        if not_http2(&status) {
            return AgentError::Unavailable {
                message: "the node's answer was not HTTP/2 (frame with invalid size): it \
                          likely serves TLS; then use https:// and --ca"
                    .into(),
            };
        }
        if connection_broke(&status) {
            return AgentError::Unavailable {
                message: format!(
                    "the connection to the node broke ({}); what arrived is kept: run again \
                     to resume",
                    status.message()
                ),
            };
        }
        let message = status.message().to_owned();
        match status.code() {
            Code::NotFound => AgentError::NotFound { message },
            Code::InvalidArgument | Code::OutOfRange => AgentError::Invalid { message },
            Code::Unavailable => AgentError::Unavailable { message },
            Code::Aborted => AgentError::Aborted { message },
            Code::FailedPrecondition => AgentError::FailedPrecondition { message },
            code @ (Code::Unauthenticated | Code::PermissionDenied) => {
                AgentError::Denied { code, message }
            }
            code => AgentError::Node { code, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_become_variants_that_keep_the_code_and_message() {
        let cases = [
            (Code::NotFound, Some(Code::NotFound)),
            (Code::InvalidArgument, Some(Code::InvalidArgument)),
            (Code::OutOfRange, Some(Code::InvalidArgument)),
            (Code::Unavailable, Some(Code::Unavailable)),
            (Code::Aborted, Some(Code::Aborted)),
            (Code::FailedPrecondition, Some(Code::FailedPrecondition)),
            (Code::Unauthenticated, Some(Code::Unauthenticated)),
            (Code::Internal, Some(Code::Internal)),
        ];
        for (code, mapped) in cases {
            let err = AgentError::from(tonic::Status::new(code, "what failed and why"));
            assert_eq!(err.code(), mapped, "{code:?}");
            assert_eq!(err.to_string(), "what failed and why");
        }
        assert!(matches!(
            AgentError::from(tonic::Status::not_found("no model")),
            AgentError::NotFound { .. }
        ));
        assert!(matches!(
            AgentError::from(tonic::Status::aborted("changed")),
            AgentError::Aborted { .. }
        ));
        // A connection cut mid-stream says what to do.
        let cut = AgentError::from(tonic::Status::unknown(
            "h2 protocol error: error reading a body from connection",
        ));
        assert!(matches!(cut, AgentError::Unavailable { .. }), "{cut:?}");
        assert!(cut.to_string().contains("run again to resume"), "{cut}");
    }
}
