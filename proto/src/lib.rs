//! The `modelcache.v1` contract shared by the node and the agent: the gRPC API generated
//! from `proto/modelcache/v1/cache.proto`, the reference syntax (`NAME[:VARIANT]`) and the
//! rules every receiver applies to file paths inside a model.
//!
//! Other languages generate their own stubs from the same `.proto` file (see `docs/api.md`).

pub mod reference;

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

/// The ONNX model format, generated from `proto/onnx/onnx.proto` (onnx 1.23).
#[allow(clippy::all, missing_docs)]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}
