//! Graceful shutdown by dropped senders: dropping the `watch::Sender`
//! tells every connection to finish (HTTP/1.1 closes after the current
//! response, HTTP/2 sends GOAWAY); every task holds a [`DrainToken`], and
//! shutdown waits until all are gone or its deadline passes.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Keeps shutdown waiting while it lives. Clone it into every task that
/// must finish (or be cut at the deadline) before the process exits.
#[derive(Clone, Debug)]
pub(crate) struct DrainToken(#[allow(dead_code)] mpsc::Sender<()>);

/// Tells tasks to stop and waits for them.
pub(crate) struct Drain {
    signal: Option<watch::Sender<()>>,
    token: Option<DrainToken>,
    done: mpsc::Receiver<()>,
}

impl Drain {
    /// A drain with no tasks yet.
    pub(crate) fn new() -> Drain {
        let (signal, _) = watch::channel(());
        let (tx, done) = mpsc::channel(1);
        Drain {
            signal: Some(signal),
            token: Some(DrainToken(tx)),
            done,
        }
    }

    /// A receiver that fires (with `Err`) when shutdown starts.
    pub(crate) fn watcher(&self) -> watch::Receiver<()> {
        match &self.signal {
            Some(s) => s.subscribe(),
            None => watch::channel(()).1,
        }
    }

    /// A token for a task shutdown must wait for.
    pub(crate) fn token(&self) -> DrainToken {
        match &self.token {
            Some(t) => t.clone(),
            None => DrainToken(mpsc::channel(1).0),
        }
    }

    /// Signals every task and waits until all tokens are dropped or
    /// `deadline` passes. Returns true if everything finished in time.
    pub(crate) async fn drain(mut self, deadline: Duration) -> bool {
        drop(self.signal.take());
        drop(self.token.take());
        tokio::time::timeout(deadline, self.done.recv())
            .await
            .is_ok()
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}
