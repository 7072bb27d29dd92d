//! The node's error type, and the one place that maps it to gRPC status codes.

use modelcache_proto::reference::{PathError, ReferenceError};
use tonic::{Code, Status};

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

    #[error("cache error: {0}")]
    Cache(String),

    #[error("invalid configuration: {0}")]
    Config(String),

    /// A flag clap rejected, or `--help` / `--version`.
    #[error("{0}")]
    Cli(Box<clap::Error>),

    /// One error seen by every waiter of a shared chunk fetch.
    #[error("{0}")]
    Shared(std::sync::Arc<Error>),

    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The gRPC code clients act on.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidReference(_)
            | Error::UnknownVariant { .. }
            | Error::VariantNotApplicable { .. } => Code::InvalidArgument,
            Error::ModelNotFound { .. } | Error::FileNotFound { .. } => Code::NotFound,
            Error::OffsetOutOfRange { .. } => Code::OutOfRange,
            Error::UnsafeModelPath { .. } | Error::OriginDenied { .. } => Code::FailedPrecondition,
            Error::VariantFailed { .. } => Code::FailedPrecondition,
            Error::OriginUnavailable { .. }
            | Error::OriginTruncated { .. }
            | Error::OriginReadFailed { .. } => Code::Unavailable,
            Error::OriginChanged { .. }
            | Error::OriginFileGone { .. }
            | Error::RevisionChanged { .. }
            | Error::VariantEvicted { .. } => Code::Aborted,
            Error::Origin { .. } => Code::Unavailable,
            Error::Shared(inner) => inner.code(),
            Error::Cache(_) | Error::Config(_) | Error::Cli(_) | Error::Io { .. } => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        Status::new(err.code(), err.to_string())
    }
}
