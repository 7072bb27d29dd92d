//! Read-ahead for streams, drawn from one budget for the whole node.
//!
//! Each chunk a stream reads carries a ticket, given back when the chunk's bytes are
//! dropped (once HTTP/2 has sent them): the stream's own ticket (one per stream) or room
//! from a node-wide budget. A stream reads the chunk its client waits for with its own
//! ticket, and chunks ahead of it (to keep the origin and the disk busy) with budget; a
//! stream that finds no budget left waits for its own ticket to come back instead of
//! allocating more. A client that stops reading therefore holds one chunk (the one HTTP/2
//! is sending it) and the budget it took, which comes back when the stream ends. Without
//! this, each stalled stream held `--origin-parallelism` chunks read from disk plus the
//! next one HTTP/2 asked for, and 200 of them grew the node by 3 GB.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use modelcache_proto::CHUNK_SIZE;

/// The budget is counted in KiB (a semaphore counts in `u32`).
const UNIT: u64 = 1024;
/// Smallest budget: a few streams' read-ahead.
const MIN_BUDGET: u64 = 32 << 20;
/// Largest budget: beyond it read-ahead no longer speeds anything up.
const MAX_BUDGET: u64 = 512 << 20;

/// Room for chunks read ahead, shared by every stream of the node.
#[derive(Clone)]
pub struct ReadAheadBudget {
    room: Arc<Semaphore>,
    bytes: u64,
    /// Streams ended so far.
    ended: Arc<std::sync::atomic::AtomicU64>,
}

impl ReadAheadBudget {
    /// A quarter of the memory tier, within `MIN_BUDGET..=MAX_BUDGET`.
    pub fn for_memory_capacity(memory_capacity: u64) -> Self {
        Self::new((memory_capacity / 4).clamp(MIN_BUDGET, MAX_BUDGET))
    }

    pub fn new(bytes: u64) -> Self {
        Self {
            room: Arc::new(Semaphore::new((bytes / UNIT) as usize)),
            bytes,
            ended: Default::default(),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes of the budget not taken right now.
    pub fn available(&self) -> u64 {
        self.room.available_permits() as u64 * UNIT
    }

    /// How many streams have ended since the node started.
    pub fn streams_ended(&self) -> u64 {
        self.ended.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn try_take(&self) -> Option<OwnedSemaphorePermit> {
        self.room
            .clone()
            .try_acquire_many_owned((CHUNK_SIZE / UNIT) as u32)
            .ok()
    }
}

/// Leave to hold one chunk: given back when the bytes it is attached to are dropped.
pub struct Ticket(#[allow(dead_code)] OwnedSemaphorePermit);

impl Ticket {
    /// `data`, unchanged and uncopied, holding this ticket until its last clone is dropped.
    pub fn attach(self, data: Bytes) -> Bytes {
        Bytes::from_owner(Held {
            data,
            _ticket: self,
        })
    }
}

struct Held {
    data: Bytes,
    _ticket: Ticket,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// The items `read(step, ticket)` yields for each step of `plan`, in order, with up to
/// `depth` reads going on at once: the one the consumer waits for, on the stream's own
/// ticket, and others as long as the budget has room for them.
pub struct ReadAhead<S, F, T> {
    plan: std::vec::IntoIter<S>,
    read: F,
    depth: usize,
    budget: ReadAheadBudget,
    /// The stream's own ticket: one permit.
    own: Arc<Semaphore>,
    /// Waiting for the own ticket to come back, when the budget had no room either.
    waiting: Option<BoxFuture<'static, OwnedSemaphorePermit>>,
    reads: FuturesOrdered<BoxFuture<'static, T>>,
}

impl<S, F, Fut, T> ReadAhead<S, F, T>
where
    F: FnMut(S, Ticket) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    pub fn new(plan: Vec<S>, depth: usize, budget: ReadAheadBudget, read: F) -> Self {
        Self {
            plan: plan.into_iter(),
            read,
            depth: depth.max(1),
            budget,
            own: Arc::new(Semaphore::new(1)),
            waiting: None,
            reads: FuturesOrdered::new(),
        }
    }

    fn start(&mut self, permit: OwnedSemaphorePermit) {
        if let Some(step) = self.plan.next() {
            self.reads
                .push_back(Box::pin((self.read)(step, Ticket(permit))));
        }
    }

    /// A ticket without waiting: the stream's own, else budget.
    fn try_ticket(&self) -> Option<OwnedSemaphorePermit> {
        self.own
            .clone()
            .try_acquire_owned()
            .ok()
            .or_else(|| self.budget.try_take())
    }
}

impl<S, F, T> Drop for ReadAhead<S, F, T> {
    fn drop(&mut self) {
        self.budget
            .ended
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl<S, F, Fut, T> Stream for ReadAhead<S, F, T>
where
    S: Unpin,
    F: FnMut(S, Ticket) -> Fut + Unpin,
    Fut: Future<Output = T> + Send + 'static,
{
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = &mut *self;
        if this.reads.is_empty() {
            if this.plan.len() == 0 {
                return Poll::Ready(None);
            }
            // The chunk the consumer waits for: it may have to wait for the last one to
            // be sent.
            let permit = match this.waiting.as_mut() {
                Some(waiting) => match waiting.as_mut().poll(cx) {
                    Poll::Ready(permit) => permit,
                    Poll::Pending => return Poll::Pending,
                },
                None => match this.try_ticket() {
                    Some(permit) => permit,
                    None => {
                        let own = this.own.clone();
                        let mut waiting: BoxFuture<'static, OwnedSemaphorePermit> = Box::pin(
                            async move { own.acquire_owned().await.expect("never closed") },
                        );
                        match waiting.as_mut().poll(cx) {
                            Poll::Ready(permit) => permit,
                            Poll::Pending => {
                                this.waiting = Some(waiting);
                                return Poll::Pending;
                            }
                        }
                    }
                },
            };
            this.waiting = None;
            this.start(permit);
        }
        while this.reads.len() < this.depth && this.plan.len() > 0 {
            let Some(permit) = this.try_ticket() else {
                break;
            };
            this.start(permit);
        }
        Pin::new(&mut this.reads).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn chunks(n: usize) -> Vec<usize> {
        (0..n).collect()
    }

    /// A read that yields its step's number as bytes carrying the ticket.
    async fn read(i: usize, ticket: Ticket) -> (usize, Bytes) {
        tokio::task::yield_now().await;
        (i, ticket.attach(Bytes::from(vec![i as u8; 16])))
    }

    #[tokio::test]
    async fn items_come_in_order_and_every_ticket_comes_back() {
        let budget = ReadAheadBudget::new(8 * CHUNK_SIZE);
        let mut stream = ReadAhead::new(chunks(20), 4, budget.clone(), read);
        let mut seen = Vec::new();
        while let Some((i, bytes)) = stream.next().await {
            assert_eq!(bytes[..], [i as u8; 16]);
            // Chunks read ahead hold budget until they are consumed and dropped.
            if i == 0 {
                assert!(budget.available() < budget.bytes());
            }
            seen.push(i);
        }
        assert_eq!(seen, chunks(20));
        assert_eq!(budget.available(), budget.bytes());
    }

    #[tokio::test]
    async fn streams_nobody_reads_hold_their_own_chunk_and_the_budget_only() {
        let budget = ReadAheadBudget::new(3 * CHUNK_SIZE);
        let mut streams: Vec<_> = (0..10)
            .map(|_| ReadAhead::new(chunks(100), 8, budget.clone(), read))
            .collect();
        // Each stream hands out one chunk, which its consumer keeps (HTTP/2 sending it).
        let mut sent = Vec::new();
        for s in &mut streams {
            sent.push(s.next().await.unwrap());
        }
        let ahead: usize = streams.iter().map(|s| s.reads.len()).sum();
        assert_eq!(ahead, 3, "read-ahead beyond the budget");
        assert_eq!(budget.available(), 0);
        // A stream without budget whose chunk is still being sent waits for it.
        let last = streams.last_mut().unwrap();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut *last).poll_next(&mut cx).is_pending());
        // Once it is sent, the stream goes on.
        drop(sent.pop());
        assert_eq!(last.next().await.unwrap().0, 1);
        drop(streams);
        drop(sent);
        assert_eq!(
            budget.available(),
            budget.bytes(),
            "ended streams give back"
        );
    }
}
