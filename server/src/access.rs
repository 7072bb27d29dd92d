//! One access record per RPC: counted by method and status code, and written as one
//! access-log line at info when the call's response ends: method, reference, peer,
//! bytes, duration and code. A streamed response ends when its last frame is sent or the
//! client goes away (`CANCELLED`), so the line and the call's span cover the whole
//! transfer. Health probes and reflection log at debug.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Frame, SizeHint};
use tonic::body::Body;

use crate::stats::NodeStats;

/// What a handler tells the access log about its call: the reference it was asked for.
#[derive(Clone, Debug, Default)]
pub struct RpcNote(Arc<OnceLock<String>>);

impl RpcNote {
    /// Notes the reference of the call whose request extensions hold this note.
    pub fn reference(extensions: &http::Extensions, reference: &str) {
        if let Some(note) = extensions.get::<RpcNote>() {
            let _ = note.0.set(reference.to_owned());
        }
    }
}

/// One call's record, logged and counted when it is dropped (its response ended, or the
/// call was dropped before it had one).
pub struct Access {
    method: String,
    peer: Option<std::net::SocketAddr>,
    routine: bool,
    fetch: bool,
    note: RpcNote,
    span: tracing::Span,
    started: Instant,
    /// Response body bytes sent (gRPC frames).
    bytes: u64,
    code: Option<tonic::Code>,
    /// The name of the token that let the call in, when tokens are required.
    pub client: Option<String>,
    stats: Arc<NodeStats>,
}

impl Access {
    /// The record of a call that starts now; `routine` for health probes and reflection.
    pub fn new(
        method: String,
        peer: Option<std::net::SocketAddr>,
        routine: bool,
        fetch: bool,
        note: RpcNote,
        span: tracing::Span,
        stats: &Arc<NodeStats>,
    ) -> Self {
        if fetch {
            stats.fetch_started();
        }
        Self {
            method,
            peer,
            routine,
            fetch,
            note,
            span,
            started: Instant::now(),
            bytes: 0,
            code: None,
            client: None,
            stats: stats.clone(),
        }
    }

    /// The call's response, its body counted; the record ends with the body.
    pub fn observe(mut self, response: http::Response<Body>) -> http::Response<Body> {
        // A call that failed before its first message: the status is in the headers.
        self.code = grpc_status(response.headers());
        response.map(|body| Body::new(ObservedBody { body, access: self }))
    }
}

/// The gRPC status code in a header map (response headers or trailers).
fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(tonic::Code::from(value.parse::<i32>().ok()?))
}

impl Drop for Access {
    fn drop(&mut self) {
        // No status sent: the client went away (or the server dropped the call).
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        let code_name = code_name(code);
        self.stats.rpc_ended(&self.method, code_name);
        if let Some(client) = &self.client {
            self.stats.client_rpc_ended(client, code_name);
        }
        let client = self.client.as_deref().map(tracing::field::display);
        if self.fetch {
            self.stats.fetch_ended();
        }
        let reference = self.note.0.get().map_or("", String::as_str);
        let millis = self.started.elapsed().as_secs_f64() * 1000.0;
        if !self.routine {
            self.span.record("reference", reference);
            self.span.record("bytes", self.bytes);
            self.span.record("code", code_name);
            if code != tonic::Code::Ok && code != tonic::Code::Cancelled {
                self.span.record("otel.status_code", "ERROR");
            }
        }
        let peer = self.peer.map(|p| p.to_string()).unwrap_or_default();
        if self.routine {
            tracing::debug!(target: "cache_node::access", method = %self.method, %peer, code = %code_name, "rpc");
        } else {
            tracing::info!(
                target: "cache_node::access",
                method = %self.method,
                reference = %reference,
                %peer,
                client,
                bytes = self.bytes,
                duration_ms = format_args!("{millis:.1}"),
                code = %code_name,
                "rpc"
            );
        }
    }
}

/// `OK`, `NOT_FOUND`, … as gRPC documents them.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A response body that counts its bytes and notes the status in its trailers.
struct ObservedBody {
    body: Body,
    access: Access,
}

impl http_body::Body for ObservedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.access.bytes += data.len() as u64;
            } else if let Some(trailers) = frame.trailers_ref() {
                self.access.code = grpc_status(trailers).or(self.access.code);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
