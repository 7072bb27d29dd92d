//! Progress on stderr: bars when it is a terminal, a plain line every few seconds when it
//! is not (CI logs, `kubectl logs`); counters the daemon reports; and the pacing of
//! background fetches (`--max-bandwidth`).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use modelcache_proto::Reference;

pub struct Progress {
    bar: Option<ProgressBar>,
    record: Option<Arc<Recorder>>,
    lines: Option<Mutex<Lines>>,
    counter: Option<Arc<Counter>>,
    pace: Option<(Arc<Throttle>, Arc<AtomicBool>)>,
}

/// How often a plain progress line is printed when stderr is not a terminal.
pub const LINE_EVERY: Duration = Duration::from_secs(5);

/// The state of plain progress lines.
struct Lines {
    reference: String,
    total: u64,
    done: u64,
    started: Instant,
    at_start: u64,
    last: Instant,
}

/// Bytes done of a transfer, for the daemon's `Status` and progress events.
#[derive(Debug, Default)]
pub struct Counter {
    total: AtomicU64,
    done: AtomicU64,
}

impl Counter {
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

/// A bandwidth limit shared by every background transfer: after each chunk, a transfer
/// waits until the bytes so far fit the rate.
#[derive(Debug)]
pub struct Throttle {
    bytes_per_sec: u64,
    next: Mutex<Option<Instant>>,
}

impl Throttle {
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1),
            next: Mutex::new(None),
        }
    }

    /// Waits as long as `n` more bytes take at the rate, or until `urgent` is set (a
    /// worker now waits for this transfer).
    pub async fn take(&self, n: u64, urgent: &AtomicBool) {
        let until = {
            let mut next = self.next.lock().expect("throttle lock");
            let now = Instant::now();
            let start = next.filter(|t| *t > now).unwrap_or(now);
            let until = start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
            *next = Some(until);
            until
        };
        while !urgent.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= until {
                break;
            }
            tokio::time::sleep((until - now).min(Duration::from_millis(100))).await;
        }
    }
}

/// When each transfer of a prefetch began (with the bytes already present then) and when
/// its first bytes arrived: how long a failover took, seen from the agent.
#[derive(Debug, Default)]
pub struct Recorder {
    starts: Mutex<Vec<Started>>,
}

/// One transfer (the first, or one resumed on another node).
#[derive(Clone, Copy, Debug)]
pub struct Started {
    pub at: Instant,
    /// Bytes present when it began (where it resumed).
    pub done: u64,
    /// When its first bytes arrived, if any did.
    pub first_bytes: Option<Instant>,
    /// Bytes it received.
    pub received: u64,
}

impl Recorder {
    pub fn starts(&self) -> Vec<Started> {
        self.starts.lock().expect("recorder lock").clone()
    }

    /// Bytes received so far, over every transfer.
    pub fn received(&self) -> u64 {
        self.starts().iter().map(|s| s.received).sum()
    }
}

impl Progress {
    /// Bars when stderr is a terminal, nothing otherwise.
    pub fn auto() -> Self {
        let terminal = std::io::stderr().is_terminal();
        Self {
            bar: terminal.then(ProgressBar::no_length),
            lines: (!terminal).then(|| {
                Mutex::new(Lines {
                    reference: String::new(),
                    total: 0,
                    done: 0,
                    started: Instant::now(),
                    at_start: 0,
                    last: Instant::now(),
                })
            }),
            ..Self::hidden()
        }
    }

    pub fn hidden() -> Self {
        Self {
            bar: None,
            record: None,
            lines: None,
            counter: None,
            pace: None,
        }
    }

    /// Also counts bytes into `counter`.
    pub fn counting(mut self, counter: Arc<Counter>) -> Self {
        self.counter = Some(counter);
        self
    }

    /// Paces the transfer by `throttle` unless `urgent` is set (someone waits for it).
    pub fn paced(mut self, throttle: Arc<Throttle>, urgent: Arc<AtomicBool>) -> Self {
        self.pace = Some((throttle, urgent));
        self
    }

    /// Called after each chunk: waits when a bandwidth limit applies.
    pub async fn pace(&self, n: u64) {
        if let Some((throttle, urgent)) = &self.pace
            && !urgent.load(Ordering::Relaxed)
        {
            throttle.take(n, urgent).await;
        }
    }

    /// No bars; each transfer's start and bytes recorded in the `Recorder` returned.
    pub fn recording() -> (Self, Arc<Recorder>) {
        let record = Arc::new(Recorder::default());
        let this = Self {
            record: Some(record.clone()),
            ..Self::hidden()
        };
        (this, record)
    }

    /// A spinner while the node resolves the reference; for a variant that is not built
    /// yet, that is while the node builds it.
    pub fn waiting(&self, reference: &Reference) {
        if let Some(bar) = &self.bar {
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"),
            );
            bar.set_message(if reference.is_original() {
                format!("{reference}: asking the node")
            } else {
                format!(
                    "{reference}: waiting for the node (a variant not built yet is built first)"
                )
            });
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
        }
    }

    pub fn start(&self, reference: &Reference, total: u64, done: u64) {
        if let Some(counter) = &self.counter {
            counter.total.store(total, Ordering::Relaxed);
            counter.done.store(done, Ordering::Relaxed);
        }
        if let Some(lines) = &self.lines {
            let mut l = lines.lock().expect("progress lock");
            *l = Lines {
                reference: reference.to_string(),
                total,
                done,
                started: Instant::now(),
                at_start: done,
                last: Instant::now(),
            };
            let resuming = if done > 0 {
                format!(", resuming at {}", bytesize::ByteSize(done))
            } else {
                String::new()
            };
            eprintln!(
                "{reference}: fetching {}{resuming}",
                bytesize::ByteSize(total)
            );
        }
        if let Some(record) = &self.record {
            record.starts.lock().expect("recorder lock").push(Started {
                at: Instant::now(),
                done,
                first_bytes: None,
                received: 0,
            });
        }
        if let Some(bar) = &self.bar {
            bar.disable_steady_tick();
            // Back in progress after the spinner was cleared.
            bar.reset();
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(reference.to_string());
            bar.set_length(total);
            bar.set_position(done);
            bar.reset_eta();
        }
    }

    pub fn inc(&self, n: u64) {
        if let Some(counter) = &self.counter {
            counter.done.fetch_add(n, Ordering::Relaxed);
        }
        if let Some(lines) = &self.lines {
            let mut l = lines.lock().expect("progress lock");
            l.done += n;
            if l.last.elapsed() >= LINE_EVERY {
                l.last = Instant::now();
                eprintln!("{}", l.line());
            }
        }
        if let Some(record) = &self.record
            && let Some(last) = record.starts.lock().expect("recorder lock").last_mut()
        {
            last.first_bytes.get_or_insert_with(Instant::now);
            last.received += n;
        }
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if let Some(lines) = &self.lines {
            let mut l = lines.lock().expect("progress lock");
            if !l.reference.is_empty() {
                eprintln!("{}", l.line());
                l.reference.clear();
            }
        }
    }

    pub fn abandon(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}

impl Lines {
    /// `resnet50:int8: 12.0 MiB of 24.6 MiB (48%), 10.1 MiB/s`
    fn line(&self) -> String {
        let percent = (self.done * 100).checked_div(self.total).unwrap_or(100);
        let seconds = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = ((self.done - self.at_start) as f64 / seconds) as u64;
        format!(
            "{}: {} of {} ({percent}%), {}/s",
            self.reference,
            bytesize::ByteSize(self.done),
            bytesize::ByteSize(self.total),
            bytesize::ByteSize(rate)
        )
    }
}
