//! A strict second reading of HTTP/1 request framing, beside hyper's.
//!
//! hyper parses request heads leniently where RFC 9112 allows it: a bare LF
//! ends a line, and a request carrying both `Content-Length` and
//! `Transfer-Encoding` is accepted with the length header silently dropped.
//! Neither is ambiguous once hyper has re-framed the request for the
//! backend, but both are the raw material of request smuggling, and a proxy
//! at the edge should refuse them outright (400, connection closed).
//!
//! [`H1Guard`] sees every byte read from an HTTP/1 client before hyper does
//! and follows the message framing itself (head, then a `Content-Length` or
//! chunked body, then the next head), so it knows exactly which bytes are a
//! head even when requests are pipelined. Then:
//!
//! - a violation in a head (bare LF, `Content-Length` together with
//!   `Transfer-Encoding`) overwrites the offending byte with NUL, which
//!   hyper's parser always rejects: hyper answers 400 and closes;
//! - a violation in a chunked body (bad chunk size, bare LF, missing CRLF
//!   after chunk data) is reported with the index of its request, so the
//!   server can answer 400 before anything is sent upstream when the bad
//!   bytes arrive with the head (the usual case for an attack).
//!
//! After a request that may switch protocols (`Upgrade`, `CONNECT`) or whose
//! framing hyper will refuse anyway, the guard stops looking: no byte is ever
//! changed outside a request head. It holds a few integers, never allocates,
//! and never panics.

/// Follows the framing of the requests on one HTTP/1 connection.
#[derive(Debug)]
pub struct H1Guard {
    state: State,
    /// Index (0-based) of the request whose head or body is being read.
    request: u64,
    /// Take whole heads in one pass ([`whole_head`]); off only in the
    /// tests that compare both paths.
    fast: bool,
}

#[derive(Debug)]
enum State {
    Head(Head),
    /// A `Content-Length` body: bytes left.
    Body(u64),
    /// A chunk-size line.
    ChunkSize(SizeLine),
    /// Chunk data: bytes left.
    ChunkData(u64),
    /// The CR after chunk data.
    DataCr,
    /// The LF after chunk data.
    DataLf,
    /// Trailer lines after the last chunk.
    Trailers {
        line_start: bool,
        cr: bool,
    },
    /// Not looking any more (upgrade, or a framing hyper will refuse).
    Off,
}

/// What a head says about the body that follows, and where its scan is.
#[derive(Debug, Default)]
struct Head {
    /// Lines ended so far, not counting empty lines before the request line.
    lines: u32,
    /// Nothing seen on the current line yet.
    line_empty: bool,
    /// The previous byte was CR.
    cr: bool,
    /// Lowercased start of the current header name.
    name: [u8; NAME_MAX],
    name_len: usize,
    /// Past the `:` of the current line (or the name was too long to matter).
    in_value: bool,
    /// Which header the current line is.
    field: Field,
    /// First bytes of the request line (to spot `CONNECT`).
    method: [u8; 8],
    method_len: usize,
    content_length: Option<u64>,
    /// A `Content-Length` value that is not plain digits.
    length_invalid: bool,
    /// Digits of the `Content-Length` value on the current line.
    length_digits: Option<u64>,
    chunked: bool,
    upgrade: bool,
}

const NAME_MAX: usize = 17; // "transfer-encoding"

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Field {
    #[default]
    Other,
    ContentLength,
    TransferEncoding,
    Upgrade,
}

#[derive(Debug, Default)]
struct SizeLine {
    digits: u8,
    size: u64,
    phase: SizePhase,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum SizePhase {
    #[default]
    Digits,
    /// Whitespace after the size.
    Space,
    /// A chunk extension, up to CR.
    Ext,
    /// CR seen; LF must follow.
    Cr,
}

/// What one [`H1Guard::scan`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    /// Nothing wrong.
    Clean,
    /// A head was refused: one byte was overwritten so hyper answers 400.
    HeadRefused,
    /// The body of request number `n` (0-based on this connection) is
    /// malformed.
    BadBody(u64),
}

impl Default for H1Guard {
    fn default() -> Self {
        Self::new()
    }
}

impl H1Guard {
    /// A guard for a new connection: the first request head comes next.
    pub fn new() -> H1Guard {
        H1Guard {
            state: State::Head(Head::new()),
            request: 0,
            fast: true,
        }
    }

    /// Scans bytes just read from the client, in order, before hyper parses
    /// them. May overwrite one byte of a refused head.
    pub fn scan(&mut self, buf: &mut [u8]) -> Finding {
        let mut i = 0;
        while i < buf.len() {
            match &mut self.state {
                State::Off => return Finding::Clean,
                State::Body(left) => {
                    let take = remaining(buf.len() - i, *left);
                    *left -= take as u64;
                    i += take;
                    if *left == 0 {
                        self.next_message();
                    }
                    continue;
                }
                State::ChunkData(left) => {
                    let take = remaining(buf.len() - i, *left);
                    *left -= take as u64;
                    i += take;
                    if *left == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                // A head that starts here and is clean and whole in this
                // read (the usual case): one pass over its lines.
                State::Head(h) if self.fast && h.is_fresh() => {
                    if let Some((len, next)) = whole_head(&buf[i..]) {
                        self.state = next;
                        if matches!(self.state, State::Head(_)) {
                            self.request += 1;
                        }
                        i += len;
                        continue;
                    }
                }
                // Most of a head is bytes nothing depends on (the rest of
                // the request line, header values other than
                // Content-Length): jump to the next CR or LF at once.
                // A header name: find its `:` at once.
                State::Head(h) if h.at_name_start() => {
                    if let Some(k) = memchr::memchr3(b':', b'\r', b'\n', &buf[i..]) {
                        if k > 0 && buf[i + k] == b':' {
                            h.take_name(&buf[i..i + k]);
                            i += k;
                            continue;
                        }
                    }
                }
                State::Head(h) if h.skippable() => match memchr::memchr2(b'\r', b'\n', &buf[i..]) {
                    Some(0) => {}
                    Some(k) => {
                        h.line_empty = false;
                        i += k;
                        continue;
                    }
                    None => {
                        h.line_empty = false;
                        return Finding::Clean;
                    }
                },
                _ => {}
            }
            let b = buf[i];
            match self.step(b) {
                Step::Go => {}
                Step::RefuseHead => {
                    buf[i] = 0;
                    self.state = State::Off;
                    return Finding::HeadRefused;
                }
                Step::BadBody => {
                    self.state = State::Off;
                    return Finding::BadBody(self.request);
                }
            }
            i += 1;
        }
        Finding::Clean
    }

    fn next_message(&mut self) {
        self.request += 1;
        self.state = State::Head(Head::new());
    }

    /// One byte outside a counted body.
    fn step(&mut self, b: u8) -> Step {
        match &mut self.state {
            State::Head(h) => match h.step(b) {
                HeadStep::More => Step::Go,
                HeadStep::Refuse => Step::RefuseHead,
                HeadStep::Done => {
                    let next = h.body();
                    self.state = next;
                    if matches!(self.state, State::Head(_)) {
                        self.request += 1;
                    }
                    Step::Go
                }
            },
            State::ChunkSize(line) => match line.step(b) {
                Some(None) => Step::Go,
                Some(Some(0)) => {
                    self.state = State::Trailers {
                        line_start: true,
                        cr: false,
                    };
                    Step::Go
                }
                Some(Some(size)) => {
                    self.state = State::ChunkData(size);
                    Step::Go
                }
                None => Step::BadBody,
            },
            State::DataCr if b == b'\r' => {
                self.state = State::DataLf;
                Step::Go
            }
            State::DataLf if b == b'\n' => {
                self.state = State::ChunkSize(SizeLine::default());
                Step::Go
            }
            State::DataCr | State::DataLf => Step::BadBody,
            State::Trailers { line_start, cr } => {
                if *cr {
                    if b != b'\n' {
                        return Step::BadBody;
                    }
                    if *line_start {
                        self.next_message();
                    } else {
                        *line_start = true;
                        *cr = false;
                    }
                    return Step::Go;
                }
                match b {
                    b'\r' => *cr = true,
                    b'\n' | 0 => return Step::BadBody,
                    _ => *line_start = false,
                }
                Step::Go
            }
            // Counted bodies are skipped in `scan`; Off never gets here.
            State::Body(_) | State::ChunkData(_) | State::Off => Step::Go,
        }
    }
}

/// The fast path of [`H1Guard::scan`]: a whole head at the start of `buf`
/// whose lines all end in CRLF and whose framing fields are consistent,
/// read a line at a time (one SIMD search per line; only lines whose name
/// starts like `Content-Length`, `Transfer-Encoding` or `Upgrade` are
/// looked at further). Returns its length and the state after it, exactly
/// as the byte-by-byte path would; `None` (nothing changed) for a head
/// that is not all here, or has anything the byte-by-byte path must see
/// and refuse: a bare LF or CR, `Content-Length` with
/// `Transfer-Encoding`, empty lines before the request line.
fn whole_head(buf: &[u8]) -> Option<(usize, State)> {
    if matches!(buf.first(), None | Some(b'\r' | b'\n')) {
        return None;
    }
    let mut head = Head::new();
    let mut pos = 0;
    let mut request_line = true;
    loop {
        let end = pos + memchr::memchr2(b'\r', b'\n', &buf[pos..])?;
        if buf[end] != b'\r' || buf.get(end + 1) != Some(&b'\n') {
            return None;
        }
        let line = &buf[pos..end];
        pos = end + 2;
        if line.is_empty() {
            return Some((pos, head.body()));
        }
        if request_line {
            let n = line.len().min(head.method.len());
            head.method[..n].copy_from_slice(&line[..n]);
            head.method_len = n;
            request_line = false;
        } else if matches!(line[0] | 0x20, b'c' | b't' | b'u') {
            let Some(colon) = memchr::memchr(b':', line) else {
                continue;
            };
            let name = &line[..colon];
            if name.eq_ignore_ascii_case(b"content-length") {
                if head.chunked {
                    return None;
                }
                head.length_value(&line[colon + 1..]);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                if head.content_length.is_some() || head.length_invalid {
                    return None;
                }
                head.chunked = true;
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                head.upgrade = true;
            }
        }
    }
}

fn remaining(avail: usize, left: u64) -> usize {
    usize::try_from(left).map_or(avail, |l| l.min(avail))
}

enum Step {
    Go,
    RefuseHead,
    BadBody,
}

enum HeadStep {
    More,
    Refuse,
    Done,
}

impl Head {
    fn new() -> Head {
        Head {
            line_empty: true,
            ..Head::default()
        }
    }

    /// Nothing of this head seen yet.
    #[inline]
    fn is_fresh(&self) -> bool {
        self.lines == 0 && self.line_empty && !self.cr && self.method_len == 0
    }

    /// A whole `Content-Length` value (the fast path): the same rules, in
    /// the same two steps, as byte by byte.
    fn length_value(&mut self, value: &[u8]) {
        self.length_digits = None;
        for &b in value {
            self.length_byte(b);
        }
        self.length_end();
    }

    /// One byte of a `Content-Length` value: digits (no overflow), blanks.
    fn length_byte(&mut self, b: u8) {
        match b {
            b'0'..=b'9' => {
                let d = u64::from(b - b'0');
                let v = self.length_digits.unwrap_or(0);
                match v.checked_mul(10).and_then(|v| v.checked_add(d)) {
                    Some(v) => self.length_digits = Some(v),
                    None => self.length_invalid = true,
                }
            }
            b' ' | b'\t' => {}
            _ => self.length_invalid = true,
        }
    }

    /// The end of a `Content-Length` line: no digits, or a value that
    /// differs from an earlier one, make the length invalid.
    fn length_end(&mut self) {
        match (self.length_digits, self.content_length) {
            (None, _) => self.length_invalid = true,
            (Some(n), None) => self.content_length = Some(n),
            (Some(n), Some(prev)) if n != prev => self.length_invalid = true,
            (Some(_), Some(_)) => {}
        }
    }

    /// Is the next byte the first of a header name?
    #[inline]
    fn at_name_start(&self) -> bool {
        !self.cr && !self.in_value && self.lines > 0 && self.name_len == 0 && self.line_empty
    }

    /// A whole header name (no `:`, CR or LF in it), as `header_byte` would
    /// have taken it byte by byte.
    fn take_name(&mut self, name: &[u8]) {
        for (slot, b) in self.name.iter_mut().zip(name) {
            *slot = b.to_ascii_lowercase();
        }
        self.name_len = name.len();
        self.line_empty = false;
    }

    /// Can the bytes up to the next CR or LF be skipped unread?
    #[inline]
    fn skippable(&self) -> bool {
        !self.cr
            && ((self.lines == 0 && self.method_len == self.method.len())
                || (self.in_value && self.field != Field::ContentLength))
    }

    fn step(&mut self, b: u8) -> HeadStep {
        if self.cr {
            self.cr = false;
            if b != b'\n' {
                // A CR alone: hyper refuses it too.
                return HeadStep::Refuse;
            }
            return self.end_line();
        }
        match b {
            b'\r' => {
                self.cr = true;
                HeadStep::More
            }
            // A bare LF: RFC 9112 lets a recipient accept it; we do not.
            b'\n' => HeadStep::Refuse,
            _ => {
                self.line_empty = false;
                if self.lines == 0 {
                    if self.method_len < self.method.len() {
                        self.method[self.method_len] = b;
                        self.method_len += 1;
                    }
                    return HeadStep::More;
                }
                self.header_byte(b)
            }
        }
    }

    fn header_byte(&mut self, b: u8) -> HeadStep {
        if self.in_value {
            if self.field == Field::ContentLength {
                self.length_byte(b);
            }
            return HeadStep::More;
        }
        if b == b':' {
            self.in_value = true;
            self.field = match &self.name[..self.name_len.min(NAME_MAX)] {
                b"content-length" if self.name_len == 14 => Field::ContentLength,
                b"transfer-encoding" if self.name_len == 17 => Field::TransferEncoding,
                b"upgrade" if self.name_len == 7 => Field::Upgrade,
                _ => Field::Other,
            };
            match self.field {
                Field::ContentLength if self.chunked => return HeadStep::Refuse,
                Field::TransferEncoding if self.content_length.is_some() || self.length_invalid => {
                    return HeadStep::Refuse
                }
                Field::TransferEncoding => self.chunked = true,
                Field::Upgrade => self.upgrade = true,
                Field::ContentLength | Field::Other => {}
            }
            return HeadStep::More;
        }
        if self.name_len < NAME_MAX {
            self.name[self.name_len] = b.to_ascii_lowercase();
        }
        self.name_len = self.name_len.saturating_add(1);
        HeadStep::More
    }

    fn end_line(&mut self) -> HeadStep {
        if self.line_empty {
            if self.lines == 0 {
                // Empty lines before the request line are allowed.
                return HeadStep::More;
            }
            return HeadStep::Done;
        }
        if self.field == Field::ContentLength {
            self.length_end();
        }
        self.lines = self.lines.saturating_add(1);
        self.line_empty = true;
        self.name_len = 0;
        self.in_value = false;
        self.field = Field::Other;
        self.length_digits = None;
        HeadStep::More
    }

    /// The state after this head ends.
    fn body(&self) -> State {
        let connect = self.method[..self.method_len].starts_with(b"CONNECT ");
        if connect || self.upgrade || self.length_invalid {
            // The connection may leave HTTP, or hyper refuses the head.
            return State::Off;
        }
        if self.chunked {
            return State::ChunkSize(SizeLine::default());
        }
        match self.content_length {
            Some(n) if n > 0 => State::Body(n),
            _ => State::Head(Head::new()),
        }
    }
}

impl SizeLine {
    /// `None`: malformed. `Some(None)`: more. `Some(Some(size))`: line done.
    fn step(&mut self, b: u8) -> Option<Option<u64>> {
        match self.phase {
            SizePhase::Digits => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    if self.digits >= 16 {
                        return None;
                    }
                    let d = (b as char).to_digit(16).map_or(0, u64::from);
                    self.size = self.size * 16 + d;
                    self.digits += 1;
                }
                _ if self.digits == 0 => return None,
                b' ' | b'\t' => self.phase = SizePhase::Space,
                b';' => self.phase = SizePhase::Ext,
                b'\r' => self.phase = SizePhase::Cr,
                _ => return None,
            },
            SizePhase::Space => match b {
                b' ' | b'\t' => {}
                b';' => self.phase = SizePhase::Ext,
                b'\r' => self.phase = SizePhase::Cr,
                _ => return None,
            },
            SizePhase::Ext => match b {
                b'\r' => self.phase = SizePhase::Cr,
                b'\n' | 0 => return None,
                _ => {}
            },
            SizePhase::Cr => {
                return (b == b'\n').then_some(Some(self.size));
            }
        }
        Some(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `input` split into pieces of `step` bytes; returns the findings
    /// and the bytes as hyper would see them.
    fn scan(input: &[u8], step: usize) -> (Vec<Finding>, Vec<u8>) {
        let (findings, out, _) = scan_path(input, step, true);
        (findings, out)
    }

    fn every_split(input: &[u8]) -> Vec<Finding> {
        let (want, _) = scan(input, input.len());
        for step in 1..input.len().min(40) {
            assert_eq!(scan(input, step).0, want, "split every {step} bytes");
        }
        want
    }

    #[test]
    fn clean_requests_pass_untouched() {
        let reqs: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab\ncdGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\nabcde",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nab\ncd\r\n0\r\nT: 1\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\n\n\x00",
        ];
        for r in reqs {
            let (f, out) = scan(r, r.len());
            assert!(f.is_empty(), "{f:?} for {}", String::from_utf8_lossy(r));
            assert_eq!(&out, r);
            assert!(every_split(r).is_empty());
        }
    }

    #[test]
    fn bare_lf_in_a_head_is_refused() {
        for r in [
            &b"GET / HTTP/1.1\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\n",
            b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            // The second, pipelined request is a head too.
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\nHost: a\n\n",
        ] {
            let (f, out) = scan(r, r.len());
            assert_eq!(f, [Finding::HeadRefused], "{}", String::from_utf8_lossy(r));
            assert_eq!(out.iter().filter(|&&b| b == 0).count(), 1);
            assert_eq!(every_split(r), [Finding::HeadRefused]);
        }
    }

    #[test]
    fn length_and_chunked_together_are_refused() {
        for r in [
            &b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nTRANSFER-ENCODING: chunked\r\ncontent-LENGTH: 4\r\n\r\n",
        ] {
            let (f, out) = scan(r, r.len());
            assert_eq!(f, [Finding::HeadRefused]);
            let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
            assert!(text.contains("\0 "), "{text:?}");
            assert_eq!(every_split(r), [Finding::HeadRefused]);
        }
    }

    #[test]
    fn malformed_chunks_name_their_request() {
        let head = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        for body in [
            "zz\r\nhello\r\n0\r\n\r\n",
            "5\nhello\r\n0\r\n\r\n",
            "5\r\nhelloXX0\r\n\r\n",
            "\r\n",
            "-5\r\nhello\r\n0\r\n\r\n",
            "11111111111111111\r\n",
            "5 x\r\nhello\r\n0\r\n\r\n",
            "0\r\nT: 1\n\r\n",
        ] {
            let r = format!("{head}{body}");
            assert_eq!(every_split(r.as_bytes()), [Finding::BadBody(0)], "{body:?}");
            // The same after a clean request: request number 1.
            let two = format!("GET / HTTP/1.1\r\nHost: a\r\n\r\n{r}");
            assert_eq!(
                every_split(two.as_bytes()),
                [Finding::BadBody(1)],
                "{body:?}"
            );
        }
    }

    /// Scans `input` in pieces of `step` bytes with the whole-head path on
    /// or off; returns everything observable.
    fn scan_path(input: &[u8], step: usize, fast: bool) -> (Vec<Finding>, Vec<u8>, String) {
        let mut g = H1Guard::new();
        g.fast = fast;
        let mut out = input.to_vec();
        let mut findings = Vec::new();
        for piece in out.chunks_mut(step.max(1)) {
            let f = g.scan(piece);
            if f != Finding::Clean {
                findings.push(f);
            }
        }
        let end = format!("{} {:?}", g.request, g.state);
        (findings, out, end)
    }

    /// The whole-head path decides exactly as the byte-by-byte one, for
    /// heads clean and not, whole and in pieces, pipelined and with bodies.
    #[test]
    fn whole_heads_are_read_as_byte_by_byte() {
        const FIRST: &[&str] = &[
            "GET / HTTP/1.1",
            "POST /upload HTTP/1.1",
            "CONNECT a:443 HTTP/1.1",
            "CONNEC",
            "GET http://a:80/x HTTP/1.1",
        ];
        const FIELDS: &[&str] = &[
            "Host: a",
            "Content-Length: 5",
            "content-length: 5",
            "CONTENT-LENGTH:  5 ",
            "Content-Length: 6",
            "Content-Length: 1 2",
            "Content-Length: x",
            "Content-Length:",
            "Content-Length: 99999999999999999999999",
            "Content-Length : 5",
            " Content-Length: 5",
            "Transfer-Encoding: chunked",
            "transfer-encoding: gzip, chunked",
            "Upgrade: websocket",
            "Connection: upgrade",
            "TE: trailers",
            "Cookie: a=b; c=d",
            "content-lengthx: 4",
            "Content-Type text",
            "User-Agent: x\ry",
            "u",
        ];
        const ENDS: &[&str] = &["\r\n", "\r\n", "\r\n", "\r\n", "\n", "\r"];
        const BODIES: &[&str] = &[
            "",
            "hello",
            "5\r\nhello\r\n0\r\n\r\n",
            "5;x=y\r\nhel\nl\r\n0\r\nT: 1\r\n\r\n",
            "zz\r\n",
            "\r\n",
        ];
        let mut rng = fastrand::Rng::with_seed(16);
        for _ in 0..3000 {
            let mut input = String::new();
            if rng.u8(0..20) == 0 {
                input.push_str("\r\n");
            }
            for _ in 0..rng.usize(1..4) {
                input.push_str(FIRST[rng.usize(0..FIRST.len())]);
                input.push_str("\r\n");
                for _ in 0..rng.usize(0..6) {
                    input.push_str(FIELDS[rng.usize(0..FIELDS.len())]);
                    input.push_str(if rng.u8(0..8) == 0 {
                        ENDS[rng.usize(0..ENDS.len())]
                    } else {
                        "\r\n"
                    });
                }
                input.push_str(if rng.u8(0..12) == 0 { "\n" } else { "\r\n" });
                input.push_str(BODIES[rng.usize(0..BODIES.len())]);
            }
            let bytes = input.as_bytes();
            for step in [bytes.len(), 1, 2, 7, rng.usize(1..bytes.len().max(2))] {
                assert_eq!(
                    scan_path(bytes, step, true),
                    scan_path(bytes, step, false),
                    "{input:?} in pieces of {step}"
                );
            }
        }
    }

    #[test]
    fn never_panics_on_garbage() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..2000 {
            let n = rng.usize(0..300);
            let mut bytes: Vec<u8> = (0..n)
                .map(|_| match rng.u8(0..8) {
                    0 => b'\r',
                    1 => b'\n',
                    2 => b':',
                    _ => rng.u8(..),
                })
                .collect();
            let mut g = H1Guard::new();
            let step = rng.usize(1..20);
            for piece in bytes.chunks_mut(step) {
                let _ = g.scan(piece);
            }
        }
    }
}
