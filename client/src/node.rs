//! Connecting to cache nodes: the first of `--node URL,…` that answers.

use std::time::Duration;

use modelcache_proto::Reference;
use modelcache_proto::parts::{Assembly, CHECK_PROTOCOL, MANIFEST_PROTOCOL};
use modelcache_proto::v1::model_cache_client::ModelCacheClient;
use modelcache_proto::v1::{self, ResolveRequest};
use modelcache_proto::wire::{CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_MESSAGE_SIZE, STREAM_WINDOW};
use tonic::transport::{Channel, Endpoint};

use crate::error::{AgentError, Result};

/// How long to wait for a node to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub type NodeClient = ModelCacheClient<Channel>;

/// Default node address.
pub const DEFAULT_NODE: &str = "http://127.0.0.1:7070";

fn endpoint(url: &str) -> Result<Endpoint> {
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
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

/// Connects to the first node of `nodes` that accepts a connection.
pub async fn connect(nodes: &[String]) -> Result<NodeClient> {
    connect_from(nodes, 0).await.map(|(client, _)| client)
}

/// Connects to the first node that accepts a connection, trying `nodes` in order from
/// index `first` on and then from the start; returns the client and the node's index.
pub async fn connect_from(nodes: &[String], first: usize) -> Result<(NodeClient, usize)> {
    let mut failures = Vec::new();
    let order = (0..nodes.len()).map(|i| (first + i) % nodes.len());
    for (index, url) in order.map(|i| (i, &nodes[i])) {
        match endpoint(url)?.connect().await {
            Ok(channel) => {
                tracing::debug!(node = %url, "connected");
                let client = ModelCacheClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_SIZE)
                    .max_encoding_message_size(MAX_MESSAGE_SIZE);
                return Ok((client, index));
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
    let protocol = |detail: String| AgentError::Protocol {
        reference: reference.to_string(),
        detail,
    };
    let mut page_token = String::new();
    let mut assembly: Option<Assembly> = None;
    loop {
        let response = client
            .resolve(ResolveRequest {
                reference: reference.to_string(),
                page_token: std::mem::take(&mut page_token),
                protocol: CHECK_PROTOCOL,
            })
            .await
            .map_err(|s| older_node(s, reference))?
            .into_inner();
        let manifest = response
            .manifest
            .ok_or_else(|| protocol("Resolve returned no manifest".into()))?;
        match assembly.as_mut() {
            None => assembly = Some(Assembly::new(manifest).map_err(protocol)?),
            Some(so_far) => so_far.add(manifest.files).map_err(protocol)?,
        }
        if response.next_page_token.is_empty() {
            break;
        }
        page_token = response.next_page_token;
    }
    let assembly = assembly.expect("at least one response");
    if !assembly.is_complete() {
        return Err(protocol(format!(
            "the manifest announced {} files and its parts ended early",
            assembly.file_count()
        )));
    }
    Ok(assembly.into_manifest())
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
