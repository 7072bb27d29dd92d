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
