//! The node's background work: every task it spawns (background digests, variant builds)
//! belongs to one tracker and one cancellation token, so shutdown cancels and awaits all
//! of them, and tests can wait until none is left.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};

#[derive(Clone, Default)]
pub struct Background {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Background {
    /// Runs `work` as a task of its own, cut short with `Error::ShuttingDown` when the node
    /// shuts down. It stays in the current span: work a call started is in its trace.
    pub fn spawn<T, F>(&self, work: F) -> JoinHandle<Result<T>>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        let work = tracing::Instrument::in_current_span(work);
        self.tracker.spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => Err(Error::ShuttingDown),
                result = work => result,
            }
        })
    }

    /// Resolves when the node shuts down (for work outside a task: a blocking build).
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.cancel.clone().cancelled_owned()
    }

    /// Waits until every task spawned so far, and those they spawned meanwhile, has ended.
    pub async fn idle(&self) {
        while !self.tracker.is_empty() {
            self.tracker.close();
            self.tracker.wait().await;
            if self.cancel.is_cancelled() {
                return;
            }
            self.tracker.reopen();
        }
    }

    /// Cancels every task and waits for them to end.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
