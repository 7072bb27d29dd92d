//! The W3C trace context (`traceparent`, `tracestate`) in gRPC metadata: a caller
//! [`inject`]s its span's context into a request's headers, the callee [`adopt`]s it as
//! the parent of its own span. Without an exporter (no `OTEL_*` endpoint) spans carry no
//! context and nothing is sent.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The trace-context fields of `span`, as metadata keys and values (none when spans are
/// not exported).
pub fn fields(span: &tracing::Span) -> Vec<(String, String)> {
    let mut fields = Fields(HashMap::new());
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut fields));
    fields.0.into_iter().collect()
}

/// Adds the trace context of `span` to `headers`.
pub fn inject(span: &tracing::Span, headers: &mut http::HeaderMap) {
    for (key, value) in fields(span) {
        if let (Ok(key), Ok(value)) = (
            http::HeaderName::try_from(key),
            http::HeaderValue::try_from(value),
        ) {
            headers.insert(key, value);
        }
    }
}

/// Makes the trace context in `headers`, if any, the parent of `span`.
pub fn adopt(span: &tracing::Span, headers: &http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let _ = span.set_parent(parent);
}

/// Makes a caller's `traceparent` (and `tracestate`) the parent of `span`: the agent
/// daemon's `Ensure` continues a worker's own trace this way.
pub fn adopt_traceparent(span: &tracing::Span, traceparent: &str, tracestate: &str) {
    if traceparent.is_empty() {
        return;
    }
    let mut fields = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    if !tracestate.is_empty() {
        fields.insert("tracestate".to_owned(), tracestate.to_owned());
    }
    let fields = Fields(fields);
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&fields));
    let _ = span.set_parent(parent);
}

/// The `traceparent` of `span`, when spans are exported.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    fields(span)
        .into_iter()
        .find_map(|(k, v)| (k == "traceparent").then_some(v))
}

struct Fields(HashMap<String, String>);

impl Injector for Fields {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

impl Extractor for Fields {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// A gRPC channel (any HTTP service) that adds the current span's trace context to every
/// request it sends: wrap a `tonic` channel in it and each call continues the caller's
/// trace on the server.
#[derive(Clone, Debug)]
pub struct Traced<S>(pub S);

impl<S, B> tower_service::Service<http::Request<B>> for Traced<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> S::Future {
        inject(&tracing::Span::current(), request.headers_mut());
        self.0.call(request)
    }
}
