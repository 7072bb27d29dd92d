//! Progress bars on stderr, shown only when stderr is a terminal.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use modelcache_proto::Reference;

pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Bars when stderr is a terminal, nothing otherwise.
    pub fn auto() -> Self {
        Self {
            bar: std::io::stderr().is_terminal().then(ProgressBar::no_length),
        }
    }

    pub fn hidden() -> Self {
        Self { bar: None }
    }

    pub fn start(&self, reference: &Reference, total: u64, done: u64) {
        if let Some(bar) = &self.bar {
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
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    pub fn abandon(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}
