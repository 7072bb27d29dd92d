//! The node's spans, named and shaped in one place (`docs/operations.md` lists them):
//! each opens with the fields it knows and records the rest (`revision`, `tier`, `bytes`,
//! `outcome`) when its work ends. The RPC span every call runs in is `layers`'.

use tracing::Span;
use tracing::field::Empty;

use modelcache_proto::Reference;

/// Resolving a reference to the revision served: listing or revalidating the origin,
/// asking the owner, building a variant.
pub fn resolve(reference: &Reference) -> Span {
    tracing::info_span!(
        "resolve",
        model = %reference.name(),
        variant = %reference.variant(),
        revision = Empty,
    )
}

/// One chunk through the tiers: `tier` is where it was found (memory, disk) or `origin`
/// when neither held it (read from the origin or filled from a peer).
pub fn chunk(model: &str, variant: &str, revision: &str, file: &str, index: u64) -> Span {
    tracing::info_span!(
        "chunk",
        model,
        variant,
        revision,
        file,
        chunk = index,
        tier = Empty,
        bytes = Empty,
    )
}

/// One ranged GET of the origin.
pub fn origin_get(model: &str, file: &str, range: &std::ops::Range<u64>) -> Span {
    tracing::info_span!(
        "origin_get",
        model,
        file,
        range_start = range.start,
        range_end = range.end,
        bytes = Empty,
    )
}

/// One chunk asked of a peer (the model's owner, or the next in rank).
pub fn peer_fill(peer: &str, reference: &str, revision: &str, file: &str, index: u64) -> Span {
    tracing::info_span!(
        "peer_fill",
        peer,
        reference,
        revision,
        file,
        chunk = index,
        bytes = Empty,
        outcome = Empty,
    )
}

/// A manifest asked of a peer.
pub fn peer_resolve(peer: &str, reference: &str) -> Span {
    tracing::info_span!(
        "peer_resolve",
        peer,
        reference,
        revision = Empty,
        outcome = Empty
    )
}

/// One variant build: quantizing the original's files and storing the outputs.
pub fn variant_build(model: &str, variant: &str, source: &str) -> Span {
    tracing::info_span!(
        "variant_build",
        model,
        variant,
        source_revision = source,
        revision = Empty,
        bytes = Empty,
        outcome = Empty,
    )
}

/// One round of writing chunks read from the origin to the disk tier.
pub fn disk_write(dir: &str, chunks: usize) -> Span {
    tracing::info_span!("disk_write", dir, chunks, rewritten = Empty)
}

/// `ok`, or the error's text, for a span's `outcome`.
pub fn outcome<T, E: std::fmt::Display>(span: &Span, result: &Result<T, E>) {
    match result {
        Ok(_) => span.record("outcome", "ok"),
        Err(e) => span.record("outcome", tracing::field::display(e)),
    };
}

/// Records `value` as `field` of `span` when the work succeeded.
pub fn record_ok<T, E, V: tracing::Value>(
    span: &Span,
    field: &str,
    result: &Result<T, E>,
    value: impl FnOnce(&T) -> V,
) {
    if let Ok(done) = result {
        span.record(field, value(done));
    }
}
