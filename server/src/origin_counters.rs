//! What the origin was asked and how it answered: the counters `/metrics` exports, the
//! latency the chunk reader sizes its requests by, and whether it ever answered (`/readyz`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct OriginCounters {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    /// How long the origin takes to start answering a request (a listing, or a GET's
    /// headers), in microseconds: a moving average, weight 1/4.
    latency_us: AtomicU64,
    answered: AtomicBool,
}

/// The counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginTotals {
    /// Requests sent (listings, ranged GETs, checksum HEADs).
    pub requests: u64,
    /// Object bytes read.
    pub bytes: u64,
    /// Requests that failed, and bodies cut short.
    pub errors: u64,
}

impl OriginCounters {
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The origin started answering a request after `latency`.
    pub fn answered(&self, latency: Duration) {
        self.answered.store(true, Ordering::Relaxed);
        let sample = latency.as_micros() as u64;
        let _ = self
            .latency_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |avg| {
                Some(if avg == 0 {
                    sample
                } else {
                    (3 * avg + sample) / 4
                })
            });
    }

    /// A request failed; returns `error` unchanged.
    pub fn failed<E>(&self, error: E) -> E {
        self.errors.fetch_add(1, Ordering::Relaxed);
        error
    }

    pub fn read(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Whether the origin answered any request since the node started.
    pub fn ever_answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }

    /// The moving average of the time to a first answer; zero before any.
    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::Relaxed))
    }

    pub fn totals(&self) -> OriginTotals {
        OriginTotals {
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}
