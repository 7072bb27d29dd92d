//! The `modelcache.v1` contract shared by the node and the agent: the gRPC APIs generated
//! from `proto/modelcache/v1/cache.proto` (the node's `ModelCache`) and `agent.proto` (the
//! agent daemon's `Agent`), the reference syntax (`NAME[:VARIANT]`), the
//! rules every receiver applies to file paths inside a model, the HTTP/2 and message
//! sizes both ends of a transfer use (`wire`), and the ranking of a cluster's nodes for a
//! model (`rank`: rendezvous hashing by node id, the same on nodes and agents).
//!
//! Other languages generate their own stubs from the same `.proto` file (see `docs/api.md`).

pub mod auth;
pub mod parts;
pub mod rank;
pub mod reference;
pub mod tls;

pub use reference::{Reference, ReferenceError, check_file_path, check_file_paths};

/// Bytes per chunk: the unit of caching, of BLAKE3 digests and of streamed messages.
/// Well below foyer's block size and gRPC's default 4 MiB message limit.
pub const CHUNK_SIZE: u64 = 2 * 1024 * 1024;

/// Number of chunks of a file of `size` bytes (a zero-byte file has none).
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE)
}

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("modelcache.v1");

    /// The encoded `FileDescriptorSet`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/modelcache_descriptor.bin"));
}

/// How often nodes and daemons look at their tokens file and TLS files for changes: a
/// rotated token or certificate takes effect within this long.
pub const FILES_CHECKED_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// HTTP/2 and gRPC sizes both ends of a `Fetch` use. hyper's defaults (a 64 KiB window,
/// 16 KiB frames) stall a bulk stream on every round trip and cost the receiver a wake-up
/// per 16 KiB.
pub mod wire {
    /// HTTP/2 flow-control window per stream: four 2 MiB chunks in flight to each client.
    pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
    /// HTTP/2 flow-control window per connection, shared by its streams.
    pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
    /// Largest HTTP/2 frame: a 2 MiB chunk goes out in a few frames instead of 128.
    pub const MAX_FRAME_SIZE: u32 = 1024 * 1024 - 1;
    /// Largest gRPC message sent or accepted: a chunk (2 MiB) plus its framing, under the
    /// 4 MiB that stock clients accept by default.
    pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;
    /// A gRPC message's frame header: a compression flag and a 4-byte big-endian length.
    pub const FRAME_HEADER: usize = 5;

    /// The message of a request body that holds exactly one uncompressed gRPC frame (what
    /// a node reads the hand-framed `Fetch` request from); an error says what is wrong.
    pub fn request_message(body: &[u8]) -> Result<&[u8], tonic::Status> {
        let Some((header, message)) = body.split_first_chunk::<FRAME_HEADER>() else {
            return Err(tonic::Status::invalid_argument(
                "Fetch request shorter than a gRPC frame header",
            ));
        };
        if header[0] != 0 {
            return Err(compressed_request());
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len != message.len() {
            return Err(tonic::Status::invalid_argument(format!(
                "Fetch request frame says {len} bytes but carries {}",
                message.len()
            )));
        }
        Ok(message)
    }

    pub fn compressed_request() -> tonic::Status {
        tonic::Status::unimplemented(
            "compressed Fetch requests are not supported by this node; send them uncompressed",
        )
    }
}
