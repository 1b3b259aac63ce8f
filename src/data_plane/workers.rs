//! Thread-per-core data plane.
//!
//! With `workers = N >= 2`, the proxy runs N worker threads, each with its
//! own single-threaded tokio runtime and its own listening socket bound with
//! `SO_REUSEPORT` to the same address: the kernel spreads new connections
//! across them, and a connection then lives on one thread for good, with
//! the upstream connections it uses (each worker keeps its own idle pool per
//! backend, see [`slot`]). No task ever migrates and no request wakes
//! another thread, which is how nginx and HAProxy scale too. The control
//! plane (admin API, health checks, signals) runs on the main thread.
//!
//! With one worker, everything runs on one current-thread runtime.

use std::cell::Cell;
use std::io;
use std::sync::OnceLock;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// 1..=N on worker threads, 0 elsewhere.
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// Number of per-thread slots (workers + 1), fixed before any backend exists.
static SLOTS: OnceLock<usize> = OnceLock::new();

/// How many per-thread slots per-backend structures need (1 unless
/// [`Workers::start`] ran).
pub(crate) fn slots() -> usize {
    SLOTS.get().copied().unwrap_or(1)
}

/// The calling thread's slot: 1..=N on worker threads, 0 elsewhere. Always
/// below [`slots`].
#[inline]
pub(crate) fn slot() -> usize {
    let s = SLOT.with(Cell::get);
    if s < slots() {
        s
    } else {
        0
    }
}

/// The worker threads and their runtimes.
pub(crate) struct Workers {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` worker threads, each running a current-thread runtime
    /// until [`Workers::stop`].
    pub(crate) fn start(n: usize) -> io::Result<Workers> {
        let _ = SLOTS.set(n + 1);
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 1..=n {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("switchyard-worker-{i}"))
                .spawn(move || {
                    SLOT.with(|s| s.set(i));
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(rt.handle().clone()));
                    rt.block_on(async {
                        let _ = stop_rx.await;
                    });
                })?;
            let handle = handle_rx
                .recv()
                .map_err(|_| io::Error::other("worker thread died at start"))??;
            handles.push(handle);
            stops.push(stop_tx);
            threads.push(thread);
        }
        Ok(Workers {
            handles,
            stops,
            threads,
        })
    }

    /// Handles to spawn onto, one per worker.
    pub(crate) fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Stops every worker runtime (cancelling what still runs there) and
    /// joins the threads.
    pub(crate) fn stop(self) {
        for s in self.stops {
            let _ = s.send(());
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}
