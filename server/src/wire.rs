//! The `Fetch` stream framed by hand, so that chunk bytes reach HTTP/2 without a copy.
//!
//! tonic's encoder writes every message into its own buffer: for a 2 MiB chunk, a fresh
//! 2 MiB allocation (page faults) and a copy of every byte, on the path every cached byte
//! takes. Here each chunk message goes out as two pieces: a small head (the gRPC frame
//! header, the message's other fields, and the key and length of `data`) and the chunk's
//! `Bytes` as they came from the cache; h2 sends large payloads without copying them.
//! The bytes on the wire are one standard gRPC message per `FetchResponse` (protobuf
//! fields may come in any order, and `data` comes last). Request decoding, errors and
//! every other method stay with tonic.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt, future::BoxFuture, stream};
use http_body::Frame;
use http_body_util::{BodyExt, Limited, StreamBody};
use modelcache_proto::auth::Caller;
use modelcache_proto::v1::model_cache_server::{ModelCache, ModelCacheServer};
use modelcache_proto::v1::{FetchRequest, FetchResponse, fetch_response};
use modelcache_proto::wire::{FRAME_HEADER, compressed_request, request_message};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Code, Request, Status};

use crate::access::RpcNote;
use crate::service::NodeService;

/// The path tonic routes `ModelCache.Fetch` by.
pub const FETCH_PATH: &str = "/modelcache.v1.ModelCache/Fetch";
/// `FetchResponse.chunk` and `Chunk.data` (cache.proto).
const CHUNK_FIELD: u32 = 2;
const DATA_FIELD: u32 = 3;
/// Chunk bytes of the messages already produced that go out together (see `coalesce`);
/// a 2 MiB chunk is a batch of its own.
const BATCH_BYTES: usize = 64 * 1024;
/// Pieces smaller than this are copied into one buffer with their neighbours.
const COPY_BELOW: usize = 64 * 1024;
/// Largest `FetchRequest` accepted (a reference, a revision, a path and an offset).
const MAX_REQUEST: usize = 64 * 1024;

/// The `ModelCache` service with `Fetch` answered by [`fetch`] and everything else by the
/// tonic-generated server.
#[derive(Clone)]
pub struct ModelCacheService {
    grpc: ModelCacheServer<NodeService>,
    node: Arc<NodeService>,
    /// Cancelled when open streams must end (the shutdown grace is over).
    cut: CancellationToken,
}

impl ModelCacheService {
    pub fn new(node: NodeService, max_message_size: usize, cut: CancellationToken) -> Self {
        let node = Arc::new(node);
        let grpc = ModelCacheServer::from_arc(node.clone())
            .max_decoding_message_size(max_message_size)
            .max_encoding_message_size(max_message_size);
        Self { grpc, node, cut }
    }
}

impl NamedService for ModelCacheService {
    const NAME: &'static str = <ModelCacheServer<NodeService> as NamedService>::NAME;
}

impl tower_service::Service<http::Request<Body>> for ModelCacheService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower_service::Service::<http::Request<Body>>::poll_ready(&mut self.grpc, cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != FETCH_PATH {
            return self.grpc.call(request);
        }
        let node = self.node.clone();
        let cut = self.cut.clone();
        Box::pin(async move {
            Ok(fetch(&node, request, cut)
                .await
                .unwrap_or_else(|status| status.into_http()))
        })
    }
}

/// Answers one `Fetch` call: decodes the request, runs the service's `fetch`, and frames
/// its stream (an error before the first message is a trailers-only response, as tonic
/// sends it; one mid-stream ends the stream with that status in the trailers).
async fn fetch(
    node: &NodeService,
    request: http::Request<Body>,
    cut: CancellationToken,
) -> Result<http::Response<Body>, Status> {
    let compressed = request
        .headers()
        .get("grpc-encoding")
        .is_some_and(|e| e.as_bytes() != b"identity");
    if compressed {
        return Err(compressed_request());
    }
    let (parts, body) = request.into_parts();
    let body = Limited::new(body, MAX_REQUEST)
        .collect()
        .await
        .map_err(|e| Status::invalid_argument(format!("reading the Fetch request: {e}")))?
        .to_bytes();
    let message = request_message(&body)?;
    let request = FetchRequest::decode(message)
        .map_err(|e| Status::invalid_argument(format!("decoding the Fetch request: {e}")))?;
    RpcNote::reference(&parts.extensions, &request.reference);
    let mut request = Request::new(request);
    if let Some(caller) = parts.extensions.get::<Caller>() {
        request.extensions_mut().insert(caller.clone());
    }
    let messages = until_cut(node.fetch(request).await?.into_inner(), cut);
    // Data frames of the messages (those ready together coalesced), then trailers:
    // `grpc-status` 0 after the last message, or the status of the error that ended the
    // stream.
    let frames = Batches {
        messages: messages.boxed(),
        done: false,
    }
    .flat_map(|batch| stream::iter(coalesce(batch)))
    .map_ok(Frame::data)
    .chain(stream::once(async { Err(Status::new(Code::Ok, "")) }))
    .scan(false, |ended, item| {
        let frame = match item {
            _ if *ended => None,
            Ok(frame) => Some(frame),
            Err(status) => {
                *ended = true;
                Some(Frame::trailers(trailers(&status)))
            }
        };
        std::future::ready(frame.map(Ok::<_, Infallible>))
    });
    let mut response = http::Response::new(Body::new(StreamBody::new(frames)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

/// `messages`, ended by UNAVAILABLE once `cut` is cancelled (the node is stopping).
fn until_cut<S>(
    messages: S,
    cut: CancellationToken,
) -> impl Stream<Item = Result<FetchResponse, Status>>
where
    S: Stream<Item = Result<FetchResponse, Status>> + Unpin,
{
    stream::unfold(Some((messages, cut)), |state| async move {
        let (mut messages, cut) = state?;
        tokio::select! {
            biased;
            () = cut.cancelled() => Some((
                Err(Status::unavailable(
                    "the node is shutting down: resume the transfer on another node",
                )),
                None,
            )),
            item = messages.next() => item.map(|item| (item, Some((messages, cut)))),
        }
    })
}

/// The message of a request body holding one uncompressed gRPC message.
fn trailers(status: &Status) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    if let Err(e) = status.add_header(&mut headers) {
        tracing::warn!("status {:?} not sendable as headers: {e}", status.code());
        headers.insert(
            "grpc-status",
            http::HeaderValue::from(Code::Internal as i32),
        );
    }
    headers
}

/// The messages of a stream in batches: those ready at once, while their chunk bytes stay
/// under `BATCH_BYTES`. Reading on only while messages are ready and small keeps a
/// transfer's read-ahead what it was (a large chunk is read when HTTP/2 wants it).
struct Batches<S> {
    messages: S,
    done: bool,
}

impl<S> Stream for Batches<S>
where
    S: Stream<Item = Result<FetchResponse, Status>> + Unpin,
{
    type Item = Vec<Result<FetchResponse, Status>>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while bytes < BATCH_BYTES && !self.done {
            match std::pin::Pin::new(&mut self.messages).poll_next(cx) {
                Poll::Ready(Some(message)) => {
                    bytes += match &message {
                        Ok(FetchResponse {
                            item: Some(fetch_response::Item::Chunk(chunk)),
                        }) => chunk.data.len(),
                        Ok(other) => other.encoded_len(),
                        Err(_) => BATCH_BYTES,
                    };
                    batch.push(message);
                }
                Poll::Ready(None) => self.done = true,
                Poll::Pending => break,
            }
        }
        match (batch.is_empty(), self.done) {
            (false, _) => Poll::Ready(Some(batch)),
            (true, true) => Poll::Ready(None),
            (true, false) => Poll::Pending,
        }
    }
}

/// The pieces of `batch`'s messages as HTTP/2 data: pieces under `COPY_BELOW` bytes
/// copied together into one buffer, larger ones (chunk data) sent as they are. A model of
/// many small files would otherwise go out as two tiny DATA frames per file, which h2
/// clients count as abuse (`ENHANCE_YOUR_CALM`, "too_many_data_frames") when they read
/// slower than the node sends; an error ends the batch.
fn coalesce(mut batch: Vec<Result<FetchResponse, Status>>) -> Vec<Result<Bytes, Status>> {
    // Alone (a large chunk, or a stream that sends one message at a time): its pieces as
    // `encode` made them, nothing copied.
    if batch.len() == 1 {
        return match batch.pop() {
            Some(Ok(message)) => encode(message).map(Ok).collect(),
            Some(Err(status)) => vec![Err(status)],
            None => Vec::new(),
        };
    }
    let mut out = Vec::new();
    let mut small = BytesMut::new();
    for message in batch {
        match message {
            Ok(message) => {
                for piece in encode(message) {
                    if piece.len() < COPY_BELOW {
                        small.extend_from_slice(&piece);
                    } else {
                        if !small.is_empty() {
                            out.push(Ok(small.split().freeze()));
                        }
                        out.push(Ok(piece));
                    }
                }
            }
            Err(status) => {
                if !small.is_empty() {
                    out.push(Ok(small.split().freeze()));
                }
                out.push(Err(status));
                return out;
            }
        }
    }
    if !small.is_empty() {
        out.push(Ok(small.freeze()));
    }
    out
}

/// One `FetchResponse` as a gRPC message: a chunk as a head and its data, untouched;
/// anything else (the manifest) encoded whole.
fn encode(message: FetchResponse) -> impl Iterator<Item = Bytes> {
    let (head, data) = match message.item {
        Some(fetch_response::Item::Chunk(mut chunk)) => {
            let data = std::mem::take(&mut chunk.data);
            let data_field = key_len(DATA_FIELD) + encoded_len_varint(data.len() as u64);
            let chunk_len = chunk.encoded_len() + data_field + data.len();
            let message_len =
                key_len(CHUNK_FIELD) + encoded_len_varint(chunk_len as u64) + chunk_len;
            let mut head = BytesMut::with_capacity(FRAME_HEADER + message_len - data.len());
            frame_header(&mut head, message_len);
            encode_key(CHUNK_FIELD, WireType::LengthDelimited, &mut head);
            encode_varint(chunk_len as u64, &mut head);
            chunk
                .encode(&mut head)
                .expect("the head was sized for the chunk's fields");
            encode_key(DATA_FIELD, WireType::LengthDelimited, &mut head);
            encode_varint(data.len() as u64, &mut head);
            (head.freeze(), Some(data))
        }
        item => {
            let message = FetchResponse { item };
            let mut head = BytesMut::with_capacity(FRAME_HEADER + message.encoded_len());
            frame_header(&mut head, message.encoded_len());
            message
                .encode(&mut head)
                .expect("the buffer was sized for the message");
            (head.freeze(), None)
        }
    };
    std::iter::once(head).chain(data.filter(|d| !d.is_empty()))
}

fn frame_header(buf: &mut BytesMut, message_len: usize) {
    buf.put_u8(0);
    buf.put_u32(u32::try_from(message_len).expect("chunks are far below 4 GiB"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcache_proto::v1::{Chunk, Manifest};

    fn framed(message: FetchResponse) -> Bytes {
        let mut out = BytesMut::new();
        for piece in encode(message) {
            out.extend_from_slice(&piece);
        }
        out.freeze()
    }

    #[test]
    fn messages_decode_as_what_was_sent() {
        let chunk = FetchResponse {
            item: Some(fetch_response::Item::Chunk(Chunk {
                file_index: 3,
                offset: 7 << 21,
                data: Bytes::from((0..300_000u32).map(|i| i as u8).collect::<Vec<u8>>()),
                blake3: vec![9; 32],
            })),
        };
        let empty = FetchResponse {
            item: Some(fetch_response::Item::Chunk(Chunk {
                file_index: 0,
                offset: 0,
                data: Bytes::new(),
                blake3: vec![1; 32],
            })),
        };
        let manifest = FetchResponse {
            item: Some(fetch_response::Item::Manifest(Manifest {
                name: "resnet50".into(),
                revision: "r1".into(),
                ..Default::default()
            })),
        };
        for message in [chunk, empty, manifest] {
            let bytes = framed(message.clone());
            let body = request_message(&bytes).expect("one whole frame");
            assert_eq!(FetchResponse::decode(body).expect("decodes"), message);
        }
    }

    #[test]
    fn chunk_data_is_sent_as_it_came() {
        let data = Bytes::from(vec![5u8; 1 << 21]);
        let message = FetchResponse {
            item: Some(fetch_response::Item::Chunk(Chunk {
                file_index: 0,
                offset: 0,
                data: data.clone(),
                blake3: vec![0; 32],
            })),
        };
        let pieces: Vec<Bytes> = encode(message).collect();
        assert_eq!(pieces.len(), 2);
        assert!(pieces[0].len() < 64, "head: {} bytes", pieces[0].len());
        assert_eq!(pieces[1].as_ptr(), data.as_ptr(), "the data was copied");
    }

    #[test]
    fn malformed_request_frames_are_refused() {
        assert_eq!(
            request_message(&[0, 0, 0]).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            request_message(&[1, 0, 0, 0, 0]).unwrap_err().code(),
            Code::Unimplemented
        );
        assert_eq!(
            request_message(&[0, 0, 0, 0, 9, 1]).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(request_message(&[0, 0, 0, 0, 1, 42]).unwrap(), &[42]);
    }

    #[test]
    fn small_messages_ready_together_go_out_as_one_buffer_and_chunk_data_uncopied() {
        let chunk = |len: usize| FetchResponse {
            item: Some(fetch_response::Item::Chunk(Chunk {
                file_index: 1,
                data: Bytes::from(vec![7u8; len]),
                ..Default::default()
            })),
        };
        let tiny: Vec<_> = (0..3).map(|_| Ok(chunk(3))).collect();
        let expected: Vec<u8> = (0..3).flat_map(|_| framed(chunk(3)).to_vec()).collect();
        let out = coalesce(tiny);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].as_ref().unwrap().as_ref(), expected.as_slice());

        let big = chunk(1 << 20);
        let data = match &big.item {
            Some(fetch_response::Item::Chunk(c)) => c.data.clone(),
            _ => unreachable!(),
        };
        let out = coalesce(vec![
            Ok(chunk(3)),
            Ok(big),
            Err(Status::unavailable("gone")),
        ]);
        // The small message and the big one's head, the data as it was, then the error.
        assert_eq!(out.len(), 3);
        assert_eq!(out[1].as_ref().unwrap().as_ptr(), data.as_ptr());
        assert_eq!(out[2].as_ref().unwrap_err().code(), Code::Unavailable);
    }

    #[tokio::test]
    async fn batches_hold_ready_messages_up_to_64_kib_of_chunk_data() {
        let chunk = |len: usize| {
            Ok(FetchResponse {
                item: Some(fetch_response::Item::Chunk(Chunk {
                    data: Bytes::from(vec![1u8; len]),
                    ..Default::default()
                })),
            })
        };
        let messages = stream::iter(vec![chunk(3), chunk(3), chunk(2 << 20), chunk(3), chunk(3)]);
        let sizes: Vec<usize> = Batches {
            messages: messages.boxed(),
            done: false,
        }
        .map(|batch| batch.len())
        .collect()
        .await;
        // A large chunk ends a batch: the stream is not read ahead past it.
        assert_eq!(sizes, [3, 2]);
    }
}
