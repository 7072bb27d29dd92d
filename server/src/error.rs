//! The node's error type: kinds a caller can act on, with messages for people (what
//! failed, on which model or file, and what to do). It knows nothing of gRPC: the
//! service layer maps each kind to a status code, in one table (`service::code`).

use std::path::PathBuf;

use modelcache_proto::reference::{PathError, ReferenceError};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidReference(#[from] ReferenceError),

    #[error("no model named {name:?} in origin {origin}{hint}")]
    ModelNotFound {
        name: String,
        origin: String,
        /// Either the models found below the name, or how to list them.
        hint: String,
    },

    #[error("model {name:?} has no file {path:?}")]
    FileNotFound { name: String, path: String },

    #[error("offset {offset} is past the end of {path:?} ({size} bytes) in model {name:?}")]
    OffsetOutOfRange {
        name: String,
        path: String,
        offset: u64,
        size: u64,
    },

    #[error("model {name:?} in origin {origin} is refused: {source}")]
    UnsafeModelPath {
        name: String,
        origin: String,
        source: PathError,
    },

    #[error(
        "unknown variant {variant:?}; known variants: original, fp16, bf16, int8, int4, q8_0, q4_0"
    )]
    UnknownVariant { variant: String },

    #[error("variant {variant} of model {name:?} cannot be built: {reason}")]
    VariantNotApplicable {
        name: String,
        variant: String,
        reason: String,
    },

    #[error(
        "building {name}:{variant} failed on {path}: {reason}; the original is still served, \
         and the variant is built again once the file changes in the origin"
    )]
    VariantFailed {
        name: String,
        variant: String,
        path: String,
        reason: String,
    },

    #[error(
        "{name}:{variant} left this node's variant tier during the transfer and could not be \
         built again as the same revision (its original changed in the origin, or the variant \
         does not fit --variant-capacity); fetch again for the current revision"
    )]
    VariantEvicted { name: String, variant: String },

    #[error(
        "origin {origin} is unreachable and nothing of model {name:?} is cached: {detail}. \
         Check the origin's address and that it is up"
    )]
    OriginUnavailable {
        origin: String,
        name: String,
        detail: String,
    },

    #[error(
        "origin {origin} refused this node's credentials: {detail}. Check the node's S3 access \
         key, secret and region (AWS_* variables or --s3-* flags)"
    )]
    OriginDenied { origin: String, detail: String },

    #[error(
        "origin {origin} returned {got} bytes for bytes {start}..{end} of {name}/{path}; the \
         transfer was cut short, retry"
    )]
    OriginTruncated {
        origin: String,
        name: String,
        path: String,
        start: u64,
        end: u64,
        got: u64,
    },

    #[error(
        "origin {origin} failed while sending bytes {start}..{end} of {name}/{path}: {detail}; \
         the transfer was cut short, retry"
    )]
    OriginReadFailed {
        origin: String,
        name: String,
        path: String,
        start: u64,
        end: u64,
        detail: String,
    },

    #[error(
        "{name}/{path} changed in origin {origin} while being read (ETag {expected} became \
         {found}); fetch again to get the new revision"
    )]
    OriginChanged {
        origin: String,
        name: String,
        path: String,
        expected: String,
        found: String,
    },

    #[error(
        "{name}/{path} was removed from origin {origin} while being read; fetch again to get \
         the current revision"
    )]
    OriginFileGone {
        origin: String,
        name: String,
        path: String,
    },

    #[error(
        "model {name:?} is at revision {current} on this node, not {requested}; restart the \
         fetch to get the current revision"
    )]
    RevisionChanged {
        name: String,
        requested: String,
        current: String,
    },

    #[error("origin {origin} failed: {detail}")]
    Origin { origin: String, detail: String },

    #[error(
        "model {name:?} in origin {origin} holds an object whose name cannot be used ({detail}); \
         rename or remove it in the origin"
    )]
    OriginUnusableKey {
        origin: String,
        name: String,
        detail: String,
    },

    #[error(
        "model {name:?} in origin {origin} contains a symlink loop ({detail}); remove or fix \
         the link in the origin"
    )]
    OriginSymlinkLoop {
        origin: String,
        name: String,
        detail: String,
    },

    #[error("the node is shutting down; retry on another node or once it is back")]
    ShuttingDown,

    /// What a peer answered (its own message), or why it could not be asked.
    #[error("{message} (from peer node {peer})")]
    Peer {
        peer: String,
        failure: PeerFailure,
        message: String,
    },

    #[error(
        "chunk {index} of {name}/{path} fails its digest after a fresh read from the origin; \
         the origin's bytes changed without a new ETag, or this node's memory is failing"
    )]
    ChunkCorrupt {
        name: String,
        path: String,
        index: u64,
    },

    #[error(
        "this node's record of {name:?} contradicted the origin's bytes (chunk {index} of \
         {path}) and was discarded; fetch again"
    )]
    RecordDiscarded {
        name: String,
        path: String,
        index: u64,
    },

    #[error(
        "{name}/{path}: the bytes read from origin {origin} differ from its {detail}; the \
         node dropped them and reads the file again: fetch again"
    )]
    OriginChecksumMismatch {
        origin: String,
        name: String,
        path: String,
        /// Which checksum, what it says and what the bytes gave.
        detail: String,
    },

    #[error("{what} failed: {detail}")]
    TaskFailed { what: String, detail: String },

    #[error("cache tier at {dir}: {detail}")]
    Tier { dir: String, detail: String },

    #[error("saving manifest {}: {source}", path.display())]
    ManifestIo {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("invalid configuration: {0}")]
    Config(String),

    /// A flag clap rejected, or `--help` / `--version`.
    #[error("{0}")]
    Cli(Box<clap::Error>),

    /// One error seen by every waiter of a shared chunk fetch.
    #[error("{0}")]
    Shared(std::sync::Arc<Error>),

    #[error("{reference} is not pinned on this node")]
    NotPinned { reference: String },

    #[error(
        "pinning {reference} needs {} MiB and {dir} has {} MiB free; unpin another model or \
         free some space", needed.div_ceil(1 << 20), free >> 20
    )]
    NoRoomToPin {
        reference: String,
        dir: String,
        needed: u64,
        free: u64,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

/// How a request to a peer node failed: the kinds the node acts on differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerFailure {
    /// Unreachable, timed out or stalled, or shutting down: ask the next in rank.
    Unavailable,
    /// The peer sent bytes that fail their digest: nothing of it is kept; ask the next.
    Corrupt,
    /// The peer serves another revision (or its manifest does not add up): ask the next.
    Mismatch,
    /// The peer says there is no such model or file: the answer for every node.
    NotFound,
    /// The peer refused the request as malformed or inapplicable: the answer too.
    Refused,
    /// The peer failed otherwise (its origin refused it, a build failed): the answer too.
    Failed,
}

impl PeerFailure {
    /// Whether the next member in rank may do better.
    pub fn try_next(self) -> bool {
        matches!(
            self,
            PeerFailure::Unavailable | PeerFailure::Corrupt | PeerFailure::Mismatch
        )
    }
}

/// What a message may quote of a client's input: its first 100 characters (a request can
/// carry kilobytes of anything).
pub fn quote(input: &str) -> String {
    const LIMIT: usize = 100;
    match input.char_indices().nth(LIMIT) {
        Some((end, _)) => format!("{}…", &input[..end]),
        None => input.to_owned(),
    }
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// A background task that ended without its result (it panicked or was cancelled).
    pub fn task_failed(what: impl Into<String>, err: impl std::fmt::Display) -> Self {
        Self::TaskFailed {
            what: what.into(),
            detail: err.to_string(),
        }
    }

    /// Why the origin could not be re-listed, said of a model whose cached revision is
    /// served meanwhile (the unreachable-origin message says nothing is cached, which is
    /// then not so).
    pub fn stale_reason(&self) -> String {
        match self.root() {
            Error::OriginUnavailable { origin, detail, .. } => {
                format!("origin {origin} is unreachable: {detail}")
            }
            other => other.to_string(),
        }
    }

    /// Whether a peer failed in a way that the next member in rank may not.
    pub fn try_next_peer(&self) -> bool {
        matches!(self.root(), Error::Peer { failure, .. } if failure.try_next())
    }

    /// This error, or the one a shared fetch or build handed to every waiter.
    pub fn root(&self) -> &Error {
        match self {
            Error::Shared(inner) => inner.root(),
            other => other,
        }
    }
}

/// Turns an `object_store` error into one a caller can act on.
pub(crate) fn classify(origin: &str, name: &str, err: object_store::Error) -> Error {
    let origin = origin.to_owned();
    match err {
        object_store::Error::NotFound { .. } => Error::ModelNotFound {
            name: name.to_owned(),
            origin,
            hint: String::new(),
        },
        object_store::Error::PermissionDenied { source, .. }
        | object_store::Error::Unauthenticated { source, .. } => Error::OriginDenied {
            origin,
            detail: source.to_string(),
        },
        object_store::Error::Generic { source, .. } => {
            let detail = error_chain(source.as_ref());
            let os_error = io_error_code(source.as_ref());
            if os_error == Some(libc::ENAMETOOLONG) {
                return Error::ModelNotFound {
                    name: name.to_owned(),
                    origin,
                    hint: "; a local origin cannot hold a name longer than 255 bytes".into(),
                };
            }
            if os_error == Some(libc::ELOOP) || detail.contains("File system loop found") {
                return Error::OriginSymlinkLoop {
                    origin,
                    name: name.to_owned(),
                    detail,
                };
            }
            // List requests report a refused signature as a generic failure with the
            // status in the text; S3 answers 403 (or 401) for bad credentials.
            if detail.contains("403 Forbidden") || detail.contains("401 Unauthorized") {
                Error::OriginDenied { origin, detail }
            } else {
                Error::OriginUnavailable {
                    origin,
                    name: name.to_owned(),
                    detail,
                }
            }
        }
        object_store::Error::InvalidPath { source } => Error::OriginUnusableKey {
            origin,
            name: name.to_owned(),
            detail: source.to_string(),
        },
        other => Error::Origin {
            origin,
            detail: other.to_string(),
        },
    }
}

/// The OS error code of the first I/O error in `err`'s chain, if any.
pub(crate) fn io_error_code(err: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(code) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return Some(code);
        }
        next = e.source();
    }
    None
}

/// An error and its sources on one line.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_of_client_input_are_bounded() {
        assert_eq!(quote("model.onnx"), "model.onnx");
        let long = "ü".repeat(5000);
        let quoted = quote(&long);
        assert_eq!(quoted.chars().count(), 101);
        assert!(quoted.ends_with('…'));
    }
}
