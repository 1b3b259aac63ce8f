//! `GET /api/v1/events` (SPEC §12): Server-Sent Events.
//!
//! - `event: state` on connect and whenever the control plane publishes a
//!   routing table (every accepted change, every reload): `data` is the
//!   list of service objects, as `GET /api/v1/services` gives it;
//! - `event: stats` every second: `data` is the `/api/v1/stats` document;
//! - a `: keepalive` comment every 15 s, so that proxies in between do not
//!   time the stream out; `retry: 2000` asks browsers to reconnect after 2 s.
//!
//! Each stream is one small task writing into a bounded channel that is the
//! response body; the task ends when the client goes away, when the admin
//! listener drains, or when the client falls 16 frames behind (a stalled
//! reader is cut off rather than buffered without bound). At most
//! [`MAX_STREAMS`] streams are open at once.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{mpsc, watch};

use crate::control_plane::control::Control;

/// Concurrent event streams allowed.
pub(crate) const MAX_STREAMS: usize = 32;

/// Interval of the keepalive comment.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// A response body fed by a channel; ends when the sender is dropped.
pub(crate) struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Counts open streams; shared by the admin listener.
#[derive(Default)]
pub(crate) struct Streams {
    open: AtomicUsize,
}

/// One open stream's place in [`Streams`], given back on drop.
struct Slot(Arc<Streams>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Streams {
    fn take(self: &Arc<Self>) -> Option<Slot> {
        let prev = self.open.fetch_add(1, Ordering::Relaxed);
        if prev >= MAX_STREAMS {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Slot(Arc::clone(self)))
    }
}

/// One SSE frame.
fn frame(event: &str, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(event.len() + data.len() + 16);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // serde_json never writes a raw newline inside compact output, so the
    // document is one `data:` line.
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn state_frame(control: &Control) -> Bytes {
    let views = serde_json::to_vec(&control.views()).unwrap_or_else(|_| b"[]".to_vec());
    frame("state", &views)
}

/// Opens a stream, or `None` when [`MAX_STREAMS`] are open already.
pub(crate) fn open(
    streams: &Arc<Streams>,
    control: Arc<Control>,
    mut stats: watch::Receiver<Bytes>,
    mut drain: watch::Receiver<()>,
) -> Option<ChannelBody> {
    let slot = streams.take()?;
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let mut changes = control.changes();
    tokio::spawn(async move {
        let _slot = slot;
        let mut keepalive =
            tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
        stats.mark_unchanged();
        changes.mark_unchanged();
        let hello = [
            Bytes::from_static(b"retry: 2000\n\n"),
            state_frame(&control),
            frame("stats", &stats.borrow_and_update()),
        ];
        for f in hello {
            if tx.try_send(f).is_err() {
                return;
            }
        }
        loop {
            let f = tokio::select! {
                r = changes.changed() => match r {
                    Ok(()) => state_frame(&control),
                    Err(_) => return,
                },
                r = stats.changed() => match r {
                    Ok(()) => frame("stats", &stats.borrow_and_update()),
                    Err(_) => return,
                },
                _ = keepalive.tick() => Bytes::from_static(b": keepalive\n\n"),
                _ = drain.changed() => return,
                () = tx.closed() => return,
            };
            // A reader 16 frames behind is cut off; it reconnects and
            // gets the current state at once.
            if tx.try_send(f).is_err() {
                return;
            }
        }
    });
    Some(ChannelBody { rx })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_one_data_line_and_a_blank_line() {
        let f = frame("stats", br#"{"a":1}"#);
        assert_eq!(&f[..], b"event: stats\ndata: {\"a\":1}\n\n");
    }

    #[test]
    fn streams_are_capped_and_slots_come_back() {
        let s = Arc::new(Streams::default());
        let slots: Vec<Slot> = (0..MAX_STREAMS).filter_map(|_| s.take()).collect();
        assert_eq!(slots.len(), MAX_STREAMS);
        assert!(s.take().is_none());
        drop(slots);
        assert!(s.take().is_some());
    }
}
