//! Connecting to cache nodes: the first of `--node URL,…` that answers.

use std::time::Duration;

use modelcache_proto::v1::model_cache_client::ModelCacheClient;
use tonic::transport::{Channel, Endpoint};

use crate::error::{AgentError, Result};

/// HTTP/2 flow-control window per stream: a few 2 MiB chunks in flight.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// HTTP/2 flow-control window per connection.
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// Largest HTTP/2 frame the node may send: a 2 MiB chunk arrives in a few frames instead of
/// 128 of the 16 KiB default, and each frame costs the receiving task a wake-up.
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024 - 1;
/// Largest gRPC message accepted: a chunk plus framing.
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;
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
    let mut failures = Vec::new();
    for url in nodes {
        match endpoint(url)?.connect().await {
            Ok(channel) => {
                return Ok(ModelCacheClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_SIZE)
                    .max_encoding_message_size(MAX_MESSAGE_SIZE));
            }
            Err(e) => failures.push(format!("{url}: {}", error_chain(&e))),
        }
    }
    Err(AgentError::Unreachable {
        addrs: nodes.join(", "),
        detail: failures.join("; "),
    })
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
