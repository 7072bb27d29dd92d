//! Quotas per client, a client being the name of the token that let its calls in
//! (`--auth-tokens-file`): `Fetch` streams open at once (`--client-max-streams`; one more
//! is refused with `RESOURCE_EXHAUSTED`, the others go on) and bytes per second sent
//! (`--client-max-bandwidth`; the client's responses together are slowed to it, so one
//! client cannot take a node's whole link). Off unless given.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;

use crate::pacer::Pacer;

/// The limits, and what each client uses of them now.
pub struct Quotas {
    max_streams: Option<usize>,
    bandwidth: Option<u64>,
    clients: Mutex<HashMap<String, Arc<Client>>>,
}

struct Client {
    streams: AtomicUsize,
    pacer: Option<Pacer>,
}

/// One admitted call's share of its client's quotas, held by its response body.
pub struct Admitted {
    client: Arc<Client>,
    stream: bool,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.stream {
            self.client.streams.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Quotas {
    /// `None` when neither limit is set.
    pub fn new(max_streams: Option<usize>, bandwidth: Option<u64>) -> Option<Arc<Self>> {
        (max_streams.is_some() || bandwidth.is_some()).then(|| {
            Arc::new(Self {
                max_streams,
                bandwidth,
                clients: Mutex::new(HashMap::new()),
            })
        })
    }

    /// Admits a call of `client` (`stream`: a `Fetch`), or refuses it beyond the client's
    /// streams.
    pub fn admit(&self, client: &str, stream: bool) -> Result<Admitted, Status> {
        let state = {
            let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
            clients
                .entry(client.to_owned())
                .or_insert_with(|| {
                    Arc::new(Client {
                        streams: AtomicUsize::new(0),
                        pacer: self.bandwidth.map(Pacer::new),
                    })
                })
                .clone()
        };
        if stream {
            let open = state.streams.fetch_add(1, Ordering::AcqRel);
            if let Some(max) = self.max_streams
                && open >= max
            {
                state.streams.fetch_sub(1, Ordering::AcqRel);
                return Err(Status::resource_exhausted(format!(
                    "token {client:?} has {open} Fetch streams open, its limit on this node \
                     (--client-max-streams {max}); retry when one has ended"
                )));
            }
        }
        Ok(Admitted {
            client: state,
            stream,
        })
    }
}

/// A response body that holds its call's share of the quotas until it ends, and sends
/// its data no faster than the client's bandwidth.
pub struct PacedBody {
    body: Body,
    admitted: Admitted,
    /// A data frame waiting for its turn, and the wait.
    held: Option<(Frame<Bytes>, Pin<Box<tokio::time::Sleep>>)>,
}

impl PacedBody {
    pub fn new(body: Body, admitted: Admitted) -> Self {
        Self {
            body,
            admitted,
            held: None,
        }
    }
}

impl http_body::Body for PacedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some((_, wait)) = self.held.as_mut() {
            ready!(wait.as_mut().poll(cx));
            let (frame, _) = self.held.take().expect("held above");
            return Poll::Ready(Some(Ok(frame)));
        }
        let frame = match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        let Some(pacer) = &self.admitted.client.pacer else {
            return Poll::Ready(Some(Ok(frame)));
        };
        let len = frame.data_ref().map_or(0, Bytes::len) as u64;
        let at = pacer.reserve(len);
        if at <= tokio::time::Instant::now() {
            return Poll::Ready(Some(Ok(frame)));
        }
        self.held = Some((frame, Box::pin(tokio::time::sleep_until(at))));
        self.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_beyond_the_limit_are_refused_per_client_and_given_back() {
        let quotas = Quotas::new(Some(2), None).unwrap();
        let a1 = quotas.admit("a", true).unwrap();
        let _a2 = quotas.admit("a", true).unwrap();
        let refused = quotas.admit("a", true).err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--client-max-streams 2"));
        // Another client, and calls that are not streams, are not counted against "a".
        let _b = quotas.admit("b", true).unwrap();
        let _resolve = quotas.admit("a", false).unwrap();
        drop(a1);
        let _a3 = quotas.admit("a", true).unwrap();
    }
}
