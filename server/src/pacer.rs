//! Pacing bytes to a rate.

use std::sync::Mutex;
use std::time::Duration;

/// Paces bytes to at most `rate` per second across everyone who takes them: each piece
/// waits for its turn after the ones before it. Idle time is not saved up. The origin's
/// reads use one (`--origin-max-bandwidth`: a read that waits stops taking bytes off its
/// connection, so the origin slows down too), and each client with a bandwidth quota
/// another (`quotas`).
pub struct Pacer {
    rate: u64,
    next: Mutex<tokio::time::Instant>,
}

impl Pacer {
    pub fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1),
            next: Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits until `n` more bytes fit the rate.
    pub async fn take(&self, n: u64) {
        tokio::time::sleep_until(self.reserve(n)).await;
    }

    /// Books `n` more bytes: the moment they may go.
    pub fn reserve(&self, n: u64) -> tokio::time::Instant {
        let mut next = self.next.lock().expect("pacer lock poisoned");
        let start = (*next).max(tokio::time::Instant::now());
        *next = start + Duration::from_secs_f64(n as f64 / self.rate as f64);
        start
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_pacer_holds_reads_to_its_rate() {
        let pacer = Arc::new(Pacer::new(10_000_000));
        let started = tokio::time::Instant::now();
        // Four readers of 5 MB each, at once: 20 MB at 10 MB/s; the last piece may start
        // 1.5 s in.
        let reads = (0..4).map(|_| {
            let pacer = pacer.clone();
            tokio::spawn(async move { pacer.take(5_000_000).await })
        });
        for read in reads {
            read.await.unwrap();
        }
        assert_eq!(started.elapsed(), Duration::from_millis(1500));
        // Idle time is not saved up: after a pause, the next piece waits for nothing.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let again = tokio::time::Instant::now();
        pacer.take(1_000_000).await;
        assert_eq!(again.elapsed(), Duration::ZERO);
    }
}
