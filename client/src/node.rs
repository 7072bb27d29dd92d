//! Connecting to cache nodes: the first of `--node URL,…` that answers.

use std::sync::Arc;
use std::time::Duration;

use modelcache_proto::Reference;
use modelcache_proto::auth::WithToken;
use modelcache_proto::parts::{self, CHECK_PROTOCOL, MANIFEST_PROTOCOL, ResolveError};
use modelcache_proto::tls::{self, ClientTls};
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

/// What an agent presents to nodes: the `authorization` header, if it has a token, and
/// the TLS settings `https://` nodes are called with (`--ca`, `--cert`, `--key`; without
/// them, the system's CA bundle and no client certificate).
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub token: Option<tonic::codegen::http::HeaderValue>,
    pub tls: Option<Arc<ClientTls>>,
}

/// Default node address.
pub const DEFAULT_NODE: &str = "http://127.0.0.1:7070";

fn endpoint(url: &str) -> Result<Endpoint> {
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    // An `https://` node is called through `tls::Connect`, which makes the connection TLS.
    let url = tls::plain_uri(&url);
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
pub async fn connect(nodes: &[String], credentials: &Credentials) -> Result<NodeClient> {
    connect_from(nodes, 0, credentials)
        .await
        .map(|(client, _)| client)
}

/// Connects to the first node that accepts a connection, trying `nodes` in order from
/// index `first` on and then from the start; returns the client and the node's index.
pub async fn connect_from(
    nodes: &[String],
    first: usize,
    credentials: &Credentials,
) -> Result<(NodeClient, usize)> {
    let (channel, index) = channel_from(nodes, first, credentials).await?;
    let client = ModelCacheClient::new(Traced(WithToken {
        inner: channel,
        token: credentials.token.clone(),
    }))
    .max_decoding_message_size(MAX_MESSAGE_SIZE)
    .max_encoding_message_size(MAX_MESSAGE_SIZE);
    Ok((client, index))
}

/// The operator controls of the first node of `nodes` that accepts a connection.
pub async fn admin(
    nodes: &[String],
    credentials: &Credentials,
) -> Result<AdminClient<Traced<WithToken<Channel>>>> {
    let (channel, _) = channel_from(nodes, 0, credentials).await?;
    Ok(AdminClient::new(Traced(WithToken {
        inner: channel,
        token: credentials.token.clone(),
    })))
}

/// A connection to the first node that accepts one, in the order of `connect_from`.
async fn channel_from(
    nodes: &[String],
    first: usize,
    credentials: &Credentials,
) -> Result<(Channel, usize)> {
    let mut failures = Vec::new();
    let order = (0..nodes.len()).map(|i| (first + i) % nodes.len());
    for (index, url) in order.map(|i| (i, &nodes[i])) {
        let endpoint = endpoint(url)?;
        let connected = if tls::is_https(url) {
            let tls = match &credentials.tls {
                Some(tls) => tls.clone(),
                None => ClientTls::load(None, None).map_err(|e| AgentError::Config {
                    message: format!("{url}: {e}"),
                })?,
            };
            endpoint.connect_with_connector(tls.connect(None)).await
        } else {
            endpoint.connect_with_connector(tls::PlainConnect).await
        };
        match connected {
            Ok(channel) => {
                tracing::debug!(node = %url, "connected");
                return Ok((channel, index));
            }
            Err(e) => {
                tracing::info!(node = %url, "cannot connect: {}", error_chain(&e));
                failures.push(format!("{url}: {}{}", error_chain(&e), hint(url, &e)));
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

/// What a failed connection most likely means, when TLS is at the root of it.
fn hint(url: &str, e: &(dyn std::error::Error + 'static)) -> &'static str {
    let text = error_chain(e);
    if text.contains("TLS handshake") {
        // `tls::Connect` has said what it can.
        ""
    } else if tls::is_https(url) && text.contains("alert") {
        " (the node refused this agent's certificate: give --cert and --key, signed by the \
         node's --tls-client-ca)"
    } else if !tls::is_https(url)
        && [
            "connection closed",
            "frame",
            "protocol error",
            "reset",
            "broken pipe",
        ]
        .iter()
        .any(|w| text.contains(w))
    {
        " (does the node serve TLS? then use https:// and --ca)"
    } else {
        ""
    }
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        // A cause already told (an I/O error that repeats its source) is not repeated.
        let cause = s.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = s.source();
    }
    text
}
