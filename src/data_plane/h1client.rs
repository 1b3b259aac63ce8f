//! The proxy's own HTTP/1.1 client: one upstream connection, written and
//! read by the task of the request that holds it.
//!
//! Optimisation (issue 16). hyper's client connection is a dispatcher: a
//! request goes into a channel, a connection state machine writes it, reads
//! the head into a header map, and hands the response back through a
//! oneshot; the body comes out of another channel. A reverse proxy needs
//! none of that machinery for one exchange at a time on a connection it
//! owns: [`UpstreamConn::send`] writes the head it encodes itself (one
//! `writev` with a held body), parses the response head with `httparse`
//! straight from the read buffer (values are slices of that buffer, not
//! copies), and [`UpstreamConn::poll_body`] cuts the body out of the same
//! buffer frame by frame. Measured in `benches/load/README.md`.
//!
//! What it implements of RFC 9112, and nothing more: request framing by
//! `Content-Length` or chunked; response framing by status (1xx skipped,
//! 101 handed over as the upgraded stream, 204/304 and responses to HEAD
//! empty), `Transfer-Encoding` (chunked last, else until close),
//! `Content-Length` (conflicting values refused), or until close;
//! keep-alive unless the backend says `close`, speaks HTTP/1.0, or the
//! exchange ends in any way but cleanly.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::data_plane::backend::UpstreamBody;
use crate::data_plane::exchange::BodyError;
use crate::data_plane::headers::decimal;

/// Header slots parsed on the stack; more (up to the configured
/// `max_response_headers`) cost one allocation for that response.
const INLINE_HEADERS: usize = 100;
/// Fields the proxy may add to a response head.
const EXTRA_FIELDS: usize = 4;
/// Largest response head accepted (hyper's default buffer limit).
const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;
/// Read size for heads and small bodies.
const READ_CHUNK: usize = 8192;
/// Below this much free room the read buffer is grown before a read.
const MIN_READ: usize = 2048;
/// Largest read for a long body of known length.
const READ_MAX: usize = 64 * 1024;
/// Largest first read of a response (its head and the start of its body),
/// see [`UpstreamConn::head_read`].
const HEAD_READ_MAX: usize = READ_MAX + READ_CHUNK;
/// Room asked beyond the bytes a read is expected to bring.
const SLACK: u64 = 512;
/// Longest chunk-size line (with extensions) and trailer section accepted.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// What went wrong on an upstream connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// The backend closed the connection before the message was complete.
    #[error("connection closed before the response was complete")]
    Incomplete,
    /// A socket error.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The response broke HTTP/1.1.
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    /// More header fields than `max_response_headers`.
    #[error("response head has more than {0} header fields")]
    TooManyHeaders(usize),
    /// A response head over [`MAX_HEAD_BYTES`].
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// The client's request body failed while it went upstream.
    #[error("request body: {0}")]
    Body(BodyError),
}

impl UpstreamError {
    /// Did the connection break (reset, closed early), as opposed to the
    /// backend answering garbage?
    pub(crate) fn is_reset(&self) -> bool {
        match self {
            UpstreamError::Incomplete => true,
            UpstreamError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::WriteZero
            ),
            _ => false,
        }
    }

    /// Was it the client's body, not the backend?
    pub(crate) fn is_user(&self) -> bool {
        matches!(self, UpstreamError::Body(_))
    }

    /// Was the response head over a limit?
    pub(crate) fn is_head_too_large(&self) -> bool {
        matches!(
            self,
            UpstreamError::TooManyHeaders(_) | UpstreamError::HeadTooLarge
        )
    }
}

/// A failed [`UpstreamConn::send`]: the error, and whether nothing of the
/// request was written (so it may go on another connection as it is).
#[derive(Debug)]
pub(crate) struct SendError {
    /// Nothing of the request reached the backend.
    pub(crate) unsent: bool,
    /// What went wrong.
    pub(crate) error: UpstreamError,
}

/// An upstream byte stream: plain TCP, or TLS over it.
pub(crate) enum UpstreamIo {
    /// `http://`.
    Plain(TcpStream),
    /// `https://`.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// One HTTP/1.1 connection to a backend, pooled between exchanges.
pub(crate) struct UpstreamConn {
    io: UpstreamIo,
    /// Bytes read and not consumed yet.
    rbuf: BytesMut,
    /// The request head being written (kept for its capacity).
    wbuf: Vec<u8>,
    /// Response head fields accepted.
    max_headers: usize,
    /// May it carry another exchange once the current response body has
    /// been read to its end? Set when the response head is read.
    reusable: bool,
    /// The rest of a request body still going upstream after the response
    /// head came back (full duplex: an echo, or a backend that answers
    /// early); [`poll_body`](Self::poll_body) keeps sending it.
    upload: Option<Box<Uploading>>,
    /// Set after a response head was found incomplete: how much of the
    /// buffer has been searched for its end.
    head_scan: Option<usize>,
    /// When it went idle ([`crate::data_plane::backend::now_ms`]).
    pub(crate) idle_since_ms: u64,
    /// Room for the first read of the next response: the size of the last
    /// one when its length was known (head and body, at most
    /// [`HEAD_READ_MAX`]), else [`READ_CHUNK`]. A backend that answers
    /// 64 KiB bodies has them read with one `recvfrom` instead of an 8 KiB
    /// read, a second read and often an `EAGAIN`; small responses keep
    /// sharing one small buffer. [`shed`](Self::shed) gives a large
    /// buffer back when the connection goes idle.
    head_read: usize,
    /// The timer bounding the wait for a response head
    /// (`request_timeout`), kept from one exchange to the next: see
    /// [`HeadTimer`].
    pub(crate) head_timer: HeadTimer,
}

/// The timer that bounds the wait for a response head on one upstream
/// connection, made with its first exchange and re-armed for each later
/// one.
///
/// A new `tokio::time::Sleep` per exchange was inserted into the runtime's
/// timer wheel at its first poll and taken out again when dropped (~500
/// instructions per request, callgrind). Re-armed to a later deadline, a
/// registered timer is only moved forward (an atomic write; the wheel sees
/// the new deadline when the old one comes). The price: on a connection
/// gone idle in the pool the timer still fires once, `request_timeout`
/// after its last exchange, and wakes the task that last waited on it for
/// nothing; until then it holds that task's waker, and so its allocation
/// if the task has ended (at most one per pooled connection).
#[derive(Default)]
pub(crate) struct HeadTimer(Option<Pin<Box<tokio::time::Sleep>>>);

impl HeadTimer {
    /// The timer, set to fire at `deadline`.
    pub(crate) fn arm(&mut self, deadline: tokio::time::Instant) -> Pin<&mut tokio::time::Sleep> {
        if let Some(sleep) = &mut self.0 {
            sleep.as_mut().reset(deadline);
        }
        self.0
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)))
            .as_mut()
    }
}

/// How the request body goes upstream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Upload {
    /// No body.
    None,
    /// As it comes (`Content-Length` in the head).
    Raw,
    /// Chunked.
    Chunked,
}

impl UpstreamConn {
    /// A connection over `io` accepting response heads of up to
    /// `max_headers` fields.
    pub(crate) fn new(io: UpstreamIo, max_headers: usize) -> UpstreamConn {
        UpstreamConn {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: Vec::with_capacity(512),
            max_headers,
            reusable: true,
            upload: None,
            head_scan: None,
            idle_since_ms: 0,
            head_read: READ_CHUNK,
            head_timer: HeadTimer::default(),
        }
    }

    /// Can it go back to the pool? Only after a response read to its end
    /// with keep-alive, nothing unread left over.
    pub(crate) fn is_reusable(&self) -> bool {
        self.reusable && self.rbuf.is_empty() && self.upload.is_none()
    }

    /// Before the connection goes idle: a read buffer grown past two
    /// small reads' worth (a large response, see `head_read`) is let go,
    /// so that idle connections hold small buffers or none; the next
    /// exchange allocates what it needs, as a large response must anyway.
    pub(crate) fn shed(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > 2 * READ_CHUNK {
            self.rbuf = BytesMut::new();
        }
    }

    /// Room for a read of at least `want` bytes: the buffer is grown (or
    /// its consumed front reclaimed) only when little is left, so that many
    /// small responses share one allocation.
    fn make_room(&mut self, want: usize) {
        let room = self.rbuf.capacity() - self.rbuf.len();
        if room < MIN_READ || (want > READ_CHUNK && room < want) {
            self.rbuf.reserve(want);
        }
    }

    /// Is an idle connection still open? One read attempt (no syscall
    /// unless the socket became readable) sees the backend's close.
    pub(crate) fn is_open(&mut self) -> bool {
        if !self.is_reusable() {
            return false;
        }
        self.make_room(READ_CHUNK);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), &mut cx, &mut self.rbuf) {
            Poll::Pending => true,
            // EOF, an error, or bytes nobody asked for: not usable.
            Poll::Ready(_) => {
                self.reusable = false;
                false
            }
        }
    }

    /// Sends `req` and reads the response head. The body, if any, is then
    /// read with [`poll_body`](Self::poll_body). A 101 response leaves the
    /// connection to [`into_upgraded`](Self::into_upgraded).
    ///
    /// The request is only borrowed: a streamed body is taken from it, a
    /// body held in memory (and the head) stay, so that an idempotent
    /// request can be sent again after a reset without a copy made in
    /// advance (which every request would pay for).
    pub(crate) async fn send(
        &mut self,
        req: &mut Request<UpstreamBody>,
    ) -> Result<Response<ResponseBody>, SendError> {
        // Reusable again only once a response says so.
        self.reusable = false;
        self.head_scan = None;
        let head_only = req.method() == Method::HEAD;
        let upload = self.encode_head(req);
        let held = match (upload, req.body()) {
            (Upload::Raw, UpstreamBody::Full(Some(b))) => Some(b.clone()),
            _ => None,
        };
        let mut off = 0;
        let wrote = std::future::poll_fn(|cx| {
            let parts: [&[u8]; 2] = [&self.wbuf, held.as_deref().unwrap_or_default()];
            std::task::ready!(poll_write_all(&mut self.io, cx, &parts, &mut off))?;
            Pin::new(&mut self.io).poll_flush(cx)
        })
        .await;
        if let Err(e) = wrote {
            return Err(SendError {
                unsent: off == 0,
                error: UpstreamError::Io(e),
            });
        }
        let mut up = match (upload, held) {
            (Upload::None, _) | (_, Some(_)) => None,
            (upload, None) => Some(Box::new(Uploading {
                body: std::mem::replace(req.body_mut(), UpstreamBody::empty()),
                out: Outgoing::default(),
                chunked: upload == Upload::Chunked,
            })),
        };
        std::future::poll_fn(|cx| {
            if let Some(u) = &mut up {
                match self.poll_upload(cx, u) {
                    Poll::Ready(Ok(())) => up = None,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            let resp = std::task::ready!(self.poll_head(cx, head_only));
            // Answered before the whole request body went: the rest goes
            // on while the response body is read.
            self.upload = up.take();
            Poll::Ready(resp)
        })
        .await
        .map_err(|error| SendError {
            unsent: false,
            error,
        })
    }

    /// Writes the request head into `wbuf`, with the framing header the
    /// body needs; says how the body goes.
    fn encode_head(&mut self, req: &Request<UpstreamBody>) -> Upload {
        let w = &mut self.wbuf;
        w.clear();
        w.extend_from_slice(req.method().as_str().as_bytes());
        w.push(b' ');
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        w.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
        w.extend_from_slice(b" HTTP/1.1\r\n");
        let mut has_length = false;
        for (name, value) in req.headers() {
            if name == TRANSFER_ENCODING {
                // The framing below is the proxy's own.
                continue;
            }
            has_length |= name == CONTENT_LENGTH;
            w.extend_from_slice(name.as_str().as_bytes());
            w.extend_from_slice(b": ");
            w.extend_from_slice(value.as_bytes());
            w.extend_from_slice(b"\r\n");
        }
        let body = req.body();
        let upload = if body.is_end_stream() {
            Upload::None
        } else if has_length {
            Upload::Raw
        } else if let UpstreamBody::Full(Some(b)) = body {
            w.extend_from_slice(b"content-length: ");
            w.extend_from_slice(decimal(b.len() as u64, &mut [0; 20]));
            w.extend_from_slice(b"\r\n");
            Upload::Raw
        } else {
            w.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Upload::Chunked
        };
        w.extend_from_slice(b"\r\n");
        upload
    }

    /// Streams the client's body upstream; ready when all of it went.
    fn poll_upload(
        &mut self,
        cx: &mut Context<'_>,
        up: &mut Uploading,
    ) -> Poll<Result<(), UpstreamError>> {
        let Uploading { body, out, chunked } = up;
        let chunked = *chunked;
        loop {
            if out.pending {
                let parts: [&[u8]; 3] = [&out.prefix[..out.prefix_len], &out.data, out.suffix];
                std::task::ready!(poll_write_all(&mut self.io, cx, &parts, &mut out.off))?;
                std::task::ready!(Pin::new(&mut self.io).poll_flush(cx))?;
                out.pending = false;
                if out.last {
                    return Poll::Ready(Ok(()));
                }
            }
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(UpstreamError::Body(e))),
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are not passed on.
                    let data = frame.into_data().unwrap_or_default();
                    let last = body.is_end_stream();
                    out.set(data, chunked, last);
                }
                Poll::Ready(None) => out.set(Bytes::new(), chunked, true),
            }
        }
    }

    /// Reads until a whole final response head is in, and parses it.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_only: bool,
    ) -> Poll<Result<Response<ResponseBody>, UpstreamError>> {
        loop {
            // After a partial parse, the head is parsed again only once its
            // end has arrived (a head in pieces costs one more parse, not
            // one per piece).
            let ready_to_parse = match self.head_scan {
                None => true,
                Some(_) => self.head_ended(),
            };
            if !self.rbuf.is_empty() && ready_to_parse {
                match self.parse_head(head_only)? {
                    Parsed::Final(resp) => {
                        self.head_scan = None;
                        return Poll::Ready(Ok(resp));
                    }
                    Parsed::Informational => {
                        self.head_scan = None;
                        continue;
                    }
                    Parsed::Partial => self.head_scan = Some(self.rbuf.len()),
                }
            }
            if self.rbuf.len() >= MAX_HEAD_BYTES {
                return Poll::Ready(Err(UpstreamError::HeadTooLarge));
            }
            self.make_room(self.head_read);
            match std::task::ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                &mut self.rbuf,
            )) {
                Ok(0) => return Poll::Ready(Err(UpstreamError::Incomplete)),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }

    /// Does the buffer hold a blank line (the end of a head) past where
    /// the last search stopped?
    fn head_ended(&mut self) -> bool {
        let buf = &self.rbuf[..];
        let from = self.head_scan.unwrap_or(0).saturating_sub(3).min(buf.len());
        self.head_scan = Some(buf.len());
        memchr::memchr_iter(b'\n', &buf[from..]).any(|i| {
            let rest = &buf[from + i + 1..];
            rest.starts_with(b"\n") || rest.starts_with(b"\r\n")
        })
    }

    fn parse_head(&mut self, head_only: bool) -> Result<Parsed, UpstreamError> {
        // Uninitialised slots: filling 100 of them per head would cost more
        // than parsing a typical one.
        let mut slots = [const { std::mem::MaybeUninit::uninit() }; INLINE_HEADERS];
        let mut more;
        let limit = self.max_headers;
        let config = httparse::ParserConfig::default();
        let mut resp = httparse::Response::new(&mut []);
        let mut status = config.parse_response_with_uninit_headers(
            &mut resp,
            &self.rbuf,
            &mut slots[..limit.min(INLINE_HEADERS)],
        );
        if matches!(status, Err(httparse::Error::TooManyHeaders)) && limit > INLINE_HEADERS {
            more = vec![httparse::EMPTY_HEADER; limit];
            resp = httparse::Response::new(&mut more);
            status = resp.parse(&self.rbuf);
        }
        let len = match status {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(UpstreamError::TooManyHeaders(limit))
            }
            Err(e) => return Err(UpstreamError::Invalid(parse_error(e))),
        };
        let code = resp.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| UpstreamError::Invalid("invalid status"))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            // 100 Continue, 103 Early Hints: not passed on.
            let _ = self.rbuf.split_to(len);
            return Ok(Parsed::Informational);
        }
        let http11 = resp.version == Some(1);
        // Framing and keep-alive from the raw fields, in the same pass that
        // records where each field is.
        let base = self.rbuf.as_ptr() as usize;
        let mut length: Option<u64> = None;
        let mut chunked = None;
        let mut close = !http11;
        let n = resp.headers.len();
        let mut inline = [(0u32, 0u32, 0u32, 0u32); INLINE_HEADERS];
        let mut spilled = Vec::new();
        let spans: &mut [(u32, u32, u32, u32)] = if n <= INLINE_HEADERS {
            &mut inline[..n]
        } else {
            spilled.resize(n, (0, 0, 0, 0));
            &mut spilled
        };
        for (h, span) in resp.headers.iter().zip(spans.iter_mut()) {
            let name = h.name.as_bytes();
            let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
            *span = (
                at(name),
                name.len() as u32,
                at(h.value),
                h.value.len() as u32,
            );
            if name.eq_ignore_ascii_case(b"content-length") {
                let v = parse_length(h.value)
                    .ok_or(UpstreamError::Invalid("invalid content-length"))?;
                if length.is_some_and(|l| l != v) {
                    return Err(UpstreamError::Invalid("conflicting content-length"));
                }
                length = Some(v);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                // Only the last coding decides (RFC 9112 §6.3).
                let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                        close = false;
                    }
                }
            }
        }
        let head = self.rbuf.split_to(len).freeze();
        // Room for the fields the proxy adds (pool, request id, cookie)
        // without growing the map (a rehash and a reallocation each).
        let mut headers = HeaderMap::with_capacity(n + EXTRA_FIELDS);
        for &(ns, nl, vs, vl) in spans.iter() {
            let (ns, nl, vs, vl) = (ns as usize, nl as usize, vs as usize, vl as usize);
            let name = HeaderName::from_bytes(&head[ns..ns + nl])
                .map_err(|_| UpstreamError::Invalid("invalid header name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl))
                .map_err(|_| UpstreamError::Invalid("invalid header value"))?;
            headers.append(name, value);
        }
        let framing = if head_only
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status == StatusCode::SWITCHING_PROTOCOLS
        {
            Framing::Length(0)
        } else if let Some(chunked) = chunked {
            if length.is_some() {
                // Transfer-Encoding wins over Content-Length, which must
                // not reach the client.
                headers.remove(CONTENT_LENGTH);
            }
            if chunked {
                Framing::Chunked(Chunk::Size)
            } else {
                Framing::Close
            }
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            Framing::Close
        };
        self.reusable = !close && framing != Framing::Close;
        self.head_read = match framing {
            // `SLACK` more: a read that fills its buffer exactly leaves
            // tokio's readiness set, and the next read pays an `EAGAIN`.
            Framing::Length(n) => (len as u64 + SLACK)
                .saturating_add(n)
                .clamp(READ_CHUNK as u64, HEAD_READ_MAX as u64)
                as usize,
            _ => READ_CHUNK,
        };
        let mut resp = Response::new(ResponseBody { framing });
        *resp.status_mut() = status;
        *resp.version_mut() = if http11 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        *resp.headers_mut() = headers;
        Ok(Parsed::Final(resp))
    }

    /// The next frame of the response body `body` (from this connection),
    /// reading when the buffer has none.
    pub(crate) fn poll_body(
        &mut self,
        body: &mut ResponseBody,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        if let Some(mut up) = self.upload.take() {
            match self.poll_upload(cx, &mut up) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                Poll::Pending => self.upload = Some(up),
            }
        }
        loop {
            let mut read_hint = READ_CHUNK;
            match &mut body.framing {
                Framing::Length(0) => return Poll::Ready(None),
                Framing::Length(left) => {
                    if !self.rbuf.is_empty() {
                        let take = (*left).min(self.rbuf.len() as u64) as usize;
                        *left -= take as u64;
                        let data = self.rbuf.split_to(take).freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    read_hint = (*left)
                        .saturating_add(SLACK)
                        .clamp(READ_CHUNK as u64, READ_MAX as u64)
                        as usize;
                }
                Framing::Close => {
                    if !self.rbuf.is_empty() {
                        let data = self.rbuf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(state) => {
                    if let Err(e) = settle(state, &mut self.rbuf) {
                        return Poll::Ready(Some(Err(e)));
                    }
                    match state {
                        Chunk::Done => return Poll::Ready(None),
                        Chunk::Data(left) if !self.rbuf.is_empty() => {
                            let take = (*left).min(self.rbuf.len() as u64) as usize;
                            *left -= take as u64;
                            if *left == 0 {
                                *state = Chunk::DataEnd;
                            }
                            let data = self.rbuf.split_to(take).freeze();
                            // The end of the body may be in the buffer
                            // already: see it now, so the body ends with
                            // this frame.
                            if let Err(e) = settle(state, &mut self.rbuf) {
                                return Poll::Ready(Some(Err(e)));
                            }
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        _ => {}
                    }
                }
            }
            self.make_room(read_hint);
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    if body.framing == Framing::Close {
                        body.framing = Framing::Length(0);
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(UpstreamError::Incomplete)));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }

    /// The connection after a 101 response: the backend's side of the
    /// upgraded stream, starting with whatever it sent after the head.
    pub(crate) fn into_upgraded(self) -> Upgraded {
        Upgraded {
            prefix: self.rbuf.freeze(),
            io: self.io,
        }
    }
}

enum Parsed {
    Final(Response<ResponseBody>),
    Informational,
    Partial,
}

/// A request body going upstream.
struct Uploading {
    body: UpstreamBody,
    out: Outgoing,
    chunked: bool,
}

/// A request body chunk on its way upstream.
#[derive(Default)]
struct Outgoing {
    pending: bool,
    last: bool,
    prefix: [u8; 20],
    prefix_len: usize,
    data: Bytes,
    suffix: &'static [u8],
    off: usize,
}

impl Outgoing {
    fn set(&mut self, data: Bytes, chunked: bool, last: bool) {
        self.pending = true;
        self.last = last;
        self.off = 0;
        self.prefix_len = 0;
        self.suffix = b"";
        if chunked && !data.is_empty() {
            let mut hex = [0u8; 16];
            let mut n = data.len();
            let mut i = hex.len();
            loop {
                i -= 1;
                hex[i] = b"0123456789abcdef"[n & 15];
                n >>= 4;
                if n == 0 {
                    break;
                }
            }
            let digits = &hex[i..];
            self.prefix[..digits.len()].copy_from_slice(digits);
            self.prefix[digits.len()..digits.len() + 2].copy_from_slice(b"\r\n");
            self.prefix_len = digits.len() + 2;
            self.suffix = if last { b"\r\n0\r\n\r\n" } else { b"\r\n" };
        } else if chunked && last {
            self.suffix = b"0\r\n\r\n";
        }
        self.data = data;
    }
}

/// The framing of a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes left (0: ended, or never had a body).
    Length(u64),
    /// Chunked.
    Chunked(Chunk),
    /// Until the backend closes the connection.
    Close,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// In the trailer section, this many bytes of it read.
    Trailers(usize),
    /// Past the last chunk and the trailers.
    Done,
}

/// Advances `state` over what `buf` holds up to the next data (or the end,
/// or a line not complete yet), consuming chunk-size lines, the CRLF after
/// data, and trailers (dropped).
fn settle(state: &mut Chunk, buf: &mut BytesMut) -> Result<(), UpstreamError> {
    loop {
        match *state {
            Chunk::Data(_) | Chunk::Done => return Ok(()),
            Chunk::DataEnd => {
                if buf.starts_with(b"\r\n") {
                    let _ = buf.split_to(2);
                } else if buf.starts_with(b"\n") {
                    let _ = buf.split_to(1);
                } else if buf.is_empty() || buf[..] == b"\r"[..] {
                    return Ok(());
                } else {
                    return Err(UpstreamError::Invalid("chunk data not followed by CRLF"));
                }
                *state = Chunk::Size;
            }
            Chunk::Size => {
                let Some(end) = memchr::memchr(b'\n', buf) else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err(UpstreamError::Invalid("chunk size line too long"));
                    }
                    return Ok(());
                };
                let size = parse_chunk_size(&buf[..end])
                    .ok_or(UpstreamError::Invalid("invalid chunk size"))?;
                let _ = buf.split_to(end + 1);
                *state = if size == 0 {
                    Chunk::Trailers(0)
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Trailers(seen) => {
                let Some(end) = memchr::memchr(b'\n', buf) else {
                    if seen + buf.len() > MAX_TRAILERS {
                        return Err(UpstreamError::Invalid("trailers too large"));
                    }
                    return Ok(());
                };
                let blank = end == 0 || (end == 1 && buf[0] == b'\r');
                let _ = buf.split_to(end + 1);
                *state = if blank {
                    Chunk::Done
                } else if seen + end + 1 > MAX_TRAILERS {
                    return Err(UpstreamError::Invalid("trailers too large"));
                } else {
                    Chunk::Trailers(seen + end + 1)
                };
            }
        }
    }
}

/// A chunk-size line (without its LF): hex digits, then optional
/// whitespace and `;extensions`, then an optional CR.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_CHUNK_LINE {
        return None;
    }
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 15 {
        return None;
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest.starts_with(b";")) {
        return None;
    }
    line[..digits].iter().try_fold(0u64, |n, &b| {
        let d = (b as char).to_digit(16)?;
        Some(n * 16 + u64::from(d))
    })
}

/// A `Content-Length` value: digits only (a list of equal values, as some
/// servers send, is accepted).
fn parse_length(v: &[u8]) -> Option<u64> {
    let mut out = None;
    for part in v.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part.iter().fold(0u64, |n, &b| n * 10 + u64::from(b - b'0'));
        if out.is_some_and(|o| o != n) {
            return None;
        }
        out = Some(n);
    }
    out
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status line",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "too many header fields",
        httparse::Error::Version => "invalid HTTP version",
    }
}

/// The body of a response from [`UpstreamConn::send`]; its frames come from
/// [`UpstreamConn::poll_body`] on the same connection.
#[derive(Debug)]
pub(crate) struct ResponseBody {
    framing: Framing,
}

impl ResponseBody {
    /// Has it ended (or never had a body)?
    pub(crate) fn is_end_stream(&self) -> bool {
        matches!(
            self.framing,
            Framing::Length(0) | Framing::Chunked(Chunk::Done)
        )
    }

    /// What is known of its length.
    pub(crate) fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// Writes all of `parts` from `off` on (vectored, one syscall when the
/// socket takes it all).
fn poll_write_all(
    io: &mut UpstreamIo,
    cx: &mut Context<'_>,
    parts: &[&[u8]],
    off: &mut usize,
) -> Poll<io::Result<()>> {
    loop {
        let mut slices = [IoSlice::new(&[]); 3];
        let mut n = 0;
        let mut skip = *off;
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            slices[n] = IoSlice::new(&p[skip..]);
            skip = 0;
            n += 1;
        }
        if n == 0 {
            return Poll::Ready(Ok(()));
        }
        match std::task::ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n])) {
            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Ok(w) => *off += w,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// The backend's side of an upgraded connection: what it sent after the
/// 101 head first, then the connection itself.
pub(crate) struct Upgraded {
    prefix: Bytes,
    io: UpstreamIo,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(wire: &[u8]) -> Result<(Vec<u8>, Chunk, usize), UpstreamError> {
        let mut state = Chunk::Size;
        let mut buf = BytesMut::from(wire);
        let mut out = Vec::new();
        loop {
            settle(&mut state, &mut buf)?;
            match &mut state {
                Chunk::Data(left) if !buf.is_empty() => {
                    let take = (*left).min(buf.len() as u64) as usize;
                    *left -= take as u64;
                    out.extend_from_slice(&buf.split_to(take));
                    if *left == 0 {
                        state = Chunk::DataEnd;
                    }
                }
                _ => return Ok((out, state, buf.len())),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_trailers_and_bare_lf() {
        let (body, state, left) =
            decode(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n").expect("ok");
        assert_eq!(body, b"hello world");
        assert_eq!(state, Chunk::Done);
        assert_eq!(left, 0);
        let (body, state, _) = decode(b"3\nabc\n0\n\n").expect("bare LF");
        assert_eq!((body.as_slice(), state), (&b"abc"[..], Chunk::Done));
        let (body, state, _) = decode(b"A\r\n0123").expect("partial");
        assert_eq!((body.as_slice(), state), (&b"0123"[..], Chunk::Data(6)));
    }

    #[test]
    fn bad_chunk_framing_is_refused() {
        for wire in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"-1\r\n",
            b"1 x\r\n",
            b"ffffffffffffffff\r\n",
            b"3\r\nabcX\r\n",
        ] {
            assert!(decode(wire).is_err(), "{:?}", String::from_utf8_lossy(wire));
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 2];
        assert!(decode(&long).is_err(), "a size line that never ends");
    }

    #[test]
    fn content_length_values() {
        assert_eq!(parse_length(b"10"), Some(10));
        assert_eq!(parse_length(b"10, 10"), Some(10));
        assert_eq!(parse_length(b"10, 11"), None);
        assert_eq!(parse_length(b"+1"), None);
        assert_eq!(parse_length(b""), None);
        assert_eq!(parse_length(b"99999999999999999999"), None);
    }

    #[test]
    fn chunk_prefixes_are_hex() {
        let mut o = Outgoing::default();
        o.set(Bytes::from(vec![0; 255]), true, false);
        assert_eq!(&o.prefix[..o.prefix_len], b"ff\r\n");
        assert_eq!(o.suffix, b"\r\n");
        o.set(Bytes::from_static(b"x"), true, true);
        assert_eq!(&o.prefix[..o.prefix_len], b"1\r\n");
        assert_eq!(o.suffix, b"\r\n0\r\n\r\n");
        o.set(Bytes::new(), true, true);
        assert_eq!((o.prefix_len, o.suffix), (0, &b"0\r\n\r\n"[..]));
        o.set(Bytes::from_static(b"abc"), false, true);
        assert_eq!((o.prefix_len, o.suffix), (0, &b""[..]));
    }
}
