//! Connecting to cache nodes: the first of `--node URL,…` that answers.

use std::time::Duration;

use modelcache_proto::Reference;
use modelcache_proto::auth::WithToken;
use modelcache_proto::parts::{self, CHECK_PROTOCOL, MANIFEST_PROTOCOL, ResolveError};
use modelcache_proto::v1;
use modelcache_proto::v1::admin_client::AdminClient;
use modelcache_proto::v1::model_cache_client::ModelCacheClient;
use modelcache_proto::wire::{CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_MESSAGE_SIZE, STREAM_WINDOW};
use modelcache_telemetry::propagation::Traced;
use tonic::transport::{Channel, Endpoint};

use crate::error::{AgentError, Result};

/// How long to wait for a node to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A node client whose calls carry the current span's trace context.
pub type NodeClient = ModelCacheClient<Traced<WithToken<Channel>>>;

/// The `authorization` header an agent presents to nodes, if it has a token.
pub type Token = Option<tonic::codegen::http::HeaderValue>;

/// Default node address.
pub const DEFAULT_NODE: &str = "http://127.0.0.1:7070";

fn endpoint(url: &str) -> Result<Endpoint> {
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    // Never a silent downgrade: `https://` means TLS, which this agent cannot speak yet.
    if url.starts_with("https://") {
        return Err(AgentError::Config {
            message: format!(
                "{url}: https:// needs TLS, which this cache-agent does not support yet; use \
                 http:// on a private network (docs/security.md)"
            ),
        });
    }
    Endpoint::from_shared(url.clone())
        .map(|e| {
            e.connect_timeout(CONNECT_TIMEOUT)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME_SIZE)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
        })
        .map_err(|e| AgentError::Unreachable {
            addrs: url,
            detail: format!("not a valid address: {e}"),
        })
}

/// The URL of a member that advertises `address` (`host:port`), with the scheme the
/// given nodes use.
pub fn url_of(address: &str, given: &[String]) -> String {
    let scheme = if given.iter().any(|n| n.starts_with("https://")) {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{address}")
}

/// Connects to the first node of `nodes` that accepts a connection.
pub async fn connect(nodes: &[String], token: &Token) -> Result<NodeClient> {
    connect_from(nodes, 0, token)
        .await
        .map(|(client, _)| client)
}

/// Connects to the first node that accepts a connection, trying `nodes` in order from
/// index `first` on and then from the start; returns the client and the node's index.
pub async fn connect_from(
    nodes: &[String],
    first: usize,
    token: &Token,
) -> Result<(NodeClient, usize)> {
    let (channel, index) = channel_from(nodes, first).await?;
    let client = ModelCacheClient::new(Traced(WithToken {
        inner: channel,
        token: token.clone(),
    }))
    .max_decoding_message_size(MAX_MESSAGE_SIZE)
    .max_encoding_message_size(MAX_MESSAGE_SIZE);
    Ok((client, index))
}

/// The operator controls of the first node of `nodes` that accepts a connection.
pub async fn admin(
    nodes: &[String],
    token: &Token,
) -> Result<AdminClient<Traced<WithToken<Channel>>>> {
    let (channel, _) = channel_from(nodes, 0).await?;
    Ok(AdminClient::new(Traced(WithToken {
        inner: channel,
        token: token.clone(),
    })))
}

/// A connection to the first node that accepts one, in the order of `connect_from`.
async fn channel_from(nodes: &[String], first: usize) -> Result<(Channel, usize)> {
    let mut failures = Vec::new();
    let order = (0..nodes.len()).map(|i| (first + i) % nodes.len());
    for (index, url) in order.map(|i| (i, &nodes[i])) {
        match endpoint(url)?.connect().await {
            Ok(channel) => {
                tracing::debug!(node = %url, "connected");
                return Ok((channel, index));
            }
            Err(e) => {
                tracing::info!(node = %url, "cannot connect: {}", error_chain(&e));
                failures.push(format!("{url}: {}", error_chain(&e)));
            }
        }
    }
    Err(AgentError::Unreachable {
        addrs: nodes.join(", "),
        detail: failures.join("; "),
    })
}

/// The node's whole manifest of `reference`, asked for a part at a time when it comes in
/// parts (a model of many files, or of very large ones).
pub async fn resolve(client: &mut NodeClient, reference: &Reference) -> Result<v1::Manifest> {
    parts::resolve_whole(client, &reference.to_string(), CHECK_PROTOCOL)
        .await
        .map_err(|e| match e {
            ResolveError::Status(s) => older_node(s, reference),
            ResolveError::Protocol(detail) => AgentError::Protocol {
                reference: reference.to_string(),
                detail,
            },
        })
}

/// A message too large for the client: an older node that sends a large manifest whole.
pub fn older_node(status: tonic::Status, reference: &Reference) -> AgentError {
    if status.code() == tonic::Code::OutOfRange
        && status.message().contains("message length too large")
    {
        return AgentError::FailedPrecondition {
            message: format!(
                "the node sent the manifest of {reference} as one message over the 4 MiB \
                 limit ({}): it is a cache-node older than {}, which does not send large \
                 manifests in parts (manifest protocol {MANIFEST_PROTOCOL}); upgrade the node",
                status.message(),
                env!("CARGO_PKG_VERSION"),
            ),
        };
    }
    status.into()
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
