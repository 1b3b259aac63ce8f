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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

/// Keeps the workers' shares of the open connections even.
///
/// With `SO_REUSEPORT` the kernel picks a worker's listener by a hash of
/// the connection's addresses, blind to load: 8 long-lived HTTP/2
/// connections land 4/4 only about one time in four, and 6/2 (one worker
/// doing three quarters of the work while the other idles) one time in
/// five. So a worker that accepts a connection while it already serves
/// more than the least loaded worker (by more than an eighth) hands
/// the socket over: deregistered from its own IO driver and served on the
/// other worker's runtime, for good. That costs two `epoll_ctl` calls and
/// one cross-thread wake-up, and only when the counts have drifted apart;
/// a balanced accept costs one relaxed atomic add (and one subtraction
/// when the connection ends). This is what HAProxy's per-thread accept
/// queues do (`tune.listener.multi-queue`).
pub(crate) struct Balance {
    /// Runtime of worker `i + 1`.
    handles: Vec<Handle>,
    /// Connections open on worker `i + 1` (padded: each is written by its
    /// own worker, read by all).
    open: Box<[Padded]>,
}

#[repr(align(128))]
struct Padded(AtomicUsize);

/// Where an accepted connection is served, and its place in the count.
pub(crate) struct Placed {
    /// Another worker's runtime, when the connection should move there.
    pub(crate) move_to: Option<Handle>,
    /// Counts the connection on its worker until dropped.
    pub(crate) counted: Counted,
}

/// One open connection in [`Balance`]'s count.
pub(crate) struct Counted {
    balance: Arc<Balance>,
    worker: usize,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.balance.open[self.worker]
            .0
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balance {
    /// A balance over the worker runtimes `handles`; none for fewer than two.
    pub(crate) fn new(handles: &[Handle]) -> Option<Arc<Balance>> {
        (handles.len() >= 2).then(|| {
            Arc::new(Balance {
                handles: handles.to_vec(),
                open: handles
                    .iter()
                    .map(|_| Padded(AtomicUsize::new(0)))
                    .collect(),
            })
        })
    }

    /// Places a connection accepted on the calling worker: here, or on the
    /// least loaded worker when this one serves clearly more. `None` off a
    /// worker thread.
    pub(crate) fn place(self: &Arc<Self>) -> Option<Placed> {
        self.place_from(slot())
    }

    /// [`place`](Self::place) from the worker of slot `slot`.
    fn place_from(self: &Arc<Self>, slot: usize) -> Option<Placed> {
        let me = slot.checked_sub(1).filter(|&i| i < self.open.len())?;
        let count = |i: usize| self.open[i].0.load(Ordering::Relaxed);
        let mine = count(me);
        let (least_at, least) = (0..self.open.len())
            .map(|i| (i, count(i)))
            .min_by_key(|&(_, n)| n)
            .unwrap_or((me, mine));
        let worker = if mine > least + least / 8 {
            least_at
        } else {
            me
        };
        self.open[worker].0.fetch_add(1, Ordering::Relaxed);
        Some(Placed {
            move_to: (worker != me).then(|| self.handles[worker].clone()),
            counted: Counted {
                balance: Arc::clone(self),
                worker,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts drift apart, then a connection moves to the least loaded
    /// worker; each count falls when its connection ends.
    #[test]
    fn a_worker_far_ahead_hands_connections_over() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let handles = vec![rt.handle().clone(), rt.handle().clone()];
        let b = Balance::new(&handles).expect("two workers");
        assert!(Balance::new(&handles[..1]).is_none());
        // Off a worker thread: nothing to decide.
        assert!(b.place_from(0).is_none() && b.place_from(3).is_none());
        let first = b.place_from(1).expect("on worker 1");
        assert!(first.move_to.is_none());
        // 1 here, 0 there: the second goes over, the third stays.
        let second = b.place_from(1).expect("on worker 1");
        assert!(second.move_to.is_some());
        assert_eq!(second.counted.worker, 1);
        let third = b.place_from(1).expect("on worker 1");
        assert!(third.move_to.is_none());
        // 2 and 1: the next from worker 1 moves, one from worker 2 stays.
        let fourth = b.place_from(1).expect("on worker 1");
        assert_eq!(fourth.counted.worker, 1);
        let fifth = b.place_from(2).expect("on worker 2");
        assert!(fifth.move_to.is_none());
        // Large counts may drift by an eighth before anything moves.
        let many: Vec<_> = (0..40)
            .map(|_| b.place_from(2).expect("on worker 2"))
            .collect();
        let moved = many.iter().filter(|p| p.move_to.is_some()).count();
        assert!((15..=25).contains(&moved), "{moved} of 40 moved");
        drop(many);
        drop((first, second, third, fourth, fifth));
        assert!(b.open.iter().all(|p| p.0.load(Ordering::Relaxed) == 0));
    }
}
