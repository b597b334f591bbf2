//! HTTP for the Hub. Every request `upload` and `download` make goes through [`Http`],
//! which bounds it:
//!
//! - **in time**: connecting, and every wait on the other side (for its answer, for the
//!   next bytes of a file it sends, for it to take the next piece of an upload) may last
//!   at most the timeout (`--timeout`, [`DEFAULT_TIMEOUT`] by default). A short answer
//!   (JSON) must also arrive whole within it; a file transfer only has to keep moving,
//!   so large uploads and downloads work on any link.
//! - **in size**: an answer is read up to [`MAX_ANSWER`] bytes, an error answer up to
//!   64 KiB, a downloaded file up to the size the Hub listed for it.
//! - **in what it shows**: URLs go through [`redact_url`] and the server's own words
//!   through [`Http::server_text`], so neither a password in `HF_ENDPOINT`, nor a
//!   signed upload address, nor the token is ever printed.
//!
//! A connection that fails or breaks, and answers 408, 429 and 5xx, are retried with
//! backoff. A timeout is not: the server took the connection and went quiet, and
//! waiting for it again would only multiply the wait.
//!
//! The token is sent only to the Hub itself (the scheme, host and port of the
//! endpoint), never to an address the Hub hands out (LFS storage), and never along a
//! redirect to another host.

use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use reqwest::{Method, Url};
use sha2::{Digest, Sha256};

/// The longest wait on the Hub, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The most bytes read of a successful answer (JSON: a file list, an upload plan).
pub const MAX_ANSWER: usize = 32 << 20;

/// The most bytes read of an error answer (only its message is used).
const MAX_ERROR_ANSWER: usize = 64 << 10;

/// The most characters of the server's own words put in a message.
const MAX_SHOWN: usize = 300;

/// A failed step: what the user is told is built from this.
#[derive(Debug)]
pub struct Failure {
    /// The step, as the user knows it: "preupload", "commit", "download of config.json".
    pub step: String,
    /// The server the request went to, credentials removed.
    pub to: String,
    pub kind: Kind,
}

#[derive(Debug)]
pub enum Kind {
    /// No connection, or it broke before the exchange ended (after the retries).
    Connect(String),
    /// The other side went quiet for the whole timeout.
    Timeout(Wait, Duration),
    /// The answer is larger than lit-claire reads.
    TooLarge(usize),
    /// An answer other than 2xx: status, `X-Error-Code`, the server's message (already
    /// cleaned by [`Http::server_text`]).
    Status {
        status: u16,
        code: Option<String>,
        message: Option<String>,
    },
    /// An answer that cannot be used (not the JSON expected, a size that does not match).
    Bad(String),
    /// A local file could not be read or written; the message names it.
    Local(String),
}

/// What was being waited for when time ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Connect,
    /// The answer, once the request was sent.
    Answer,
    /// The other side to take more of the request body.
    Sending,
    /// The rest of a short answer.
    Finishing,
    /// The next bytes of a file.
    Receiving,
}

impl Failure {
    /// One line saying what happened at this step (without the consequences, which the
    /// caller knows).
    pub fn describe(&self) -> String {
        let (step, to) = (&self.step, &self.to);
        match &self.kind {
            Kind::Connect(cause) => format!("could not talk to {to} at the {step} step: {cause}"),
            Kind::Timeout(wait, t) => {
                let t = seconds(*t);
                let what = match wait {
                    Wait::Connect => {
                        format!("could not connect to {to} within {t} at the {step} step")
                    }
                    Wait::Answer => format!("{to} did not answer the {step} request within {t}"),
                    Wait::Sending => format!(
                        "{to} stopped taking the data of the {step} request: nothing moved for {t}"
                    ),
                    Wait::Finishing => {
                        format!("{to} did not finish its answer to the {step} request within {t}")
                    }
                    Wait::Receiving => {
                        format!("{to} stopped sending at the {step} step: nothing came for {t}")
                    }
                };
                format!("{what} (--timeout; raise it if the Hub is only slow)")
            }
            Kind::TooLarge(limit) => format!(
                "{to}'s answer to the {step} request is larger than {} MiB, the most lit-claire \
                 reads; check that HF_ENDPOINT is a Hugging Face Hub",
                limit >> 20
            ),
            Kind::Status {
                status, message, ..
            } => format!(
                "{to} answered {status} to the {step} request{}",
                message
                    .as_ref()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default()
            ),
            Kind::Bad(msg) => format!("{to} gave an unusable answer at the {step} step: {msg}"),
            Kind::Local(msg) => format!("{msg} (at the {step} step)"),
        }
    }
}

/// `t` for a person: "60 s", "0.5 s".
pub fn seconds(t: Duration) -> String {
    let s = t.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s} s")
    }
}

/// `text` with every URL in it shown safely: credentials (`user:password@`) become
/// `***@`, and a query or fragment (signed storage addresses carry their signature
/// there) becomes `?…`. A bare `user:password@host` (no scheme) is caught too. This is
/// the one place a URL is made fit to print.
///
/// It errs on the safe side: everything between `://` and the last `@` of a URL is
/// hidden, so a password holding `/`, `?` or `#` does not show either.
pub fn redact_url(text: &str) -> String {
    // Where a URL ends inside a sentence.
    let url_end = |s: &str| {
        s.find(|c: char| c.is_whitespace() || c.is_control() || "\"'<>()[]{},;".contains(c))
            .unwrap_or(s.len())
    };
    // One URL without its "scheme://".
    let one = |u: &str| {
        let (creds, rest) = match u.rfind('@') {
            Some(at) => (true, &u[at..]),
            None => (false, u),
        };
        let mut out = String::from(if creds { "***" } else { "" });
        let path_start = if creds { 1 } else { 0 };
        match rest[path_start..].find(['?', '#']) {
            Some(q) if path_start + q + 1 < rest.len() => {
                out.push_str(&rest[..path_start + q]);
                out.push_str("?…");
            }
            _ => out.push_str(rest),
        }
        out
    };
    if !text.contains("://") {
        let end = url_end(text);
        return if text[..end].contains('@') {
            format!("{}{}", one(&text[..end]), &text[end..])
        } else {
            text.to_string()
        };
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        let after = &rest[i + 3..];
        let end = url_end(after);
        out.push_str(&one(&after[..end]));
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// `s` percent-encoded as one path segment (a revision, a file name).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Standard base64 (RFC 4648, with padding) of `data`.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (c.get(1).copied().unwrap_or(0) as u32) << 8
            | c.get(2).copied().unwrap_or(0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Length of the base64 of `n` bytes.
pub fn base64_len(n: u64) -> u64 {
    n.div_ceil(3) * 4
}

/// A piece of a request body made of text and files.
#[derive(Debug, Clone)]
pub enum Piece {
    Text(Vec<u8>),
    /// `len` bytes of `path` from `offset`, as they are or in base64.
    File {
        path: PathBuf,
        offset: u64,
        len: u64,
        base64: bool,
    },
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Text(t) => t.len() as u64,
            Piece::File { len, base64, .. } => {
                if *base64 {
                    base64_len(*len)
                } else {
                    *len
                }
            }
        }
    }
}

/// A request body.
#[derive(Debug, Clone, Default)]
pub enum Body {
    #[default]
    None,
    /// Bytes with their content type.
    Bytes(Vec<u8>, &'static str),
    /// Text and files streamed from disk (any size), with an optional content type.
    Pieces(Arc<Vec<Piece>>, Option<&'static str>),
}

/// One request.
#[derive(Debug, Clone)]
pub struct Call {
    pub step: String,
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    /// Send the token (only ever to the Hub itself).
    pub auth: bool,
}

impl Call {
    pub fn new(step: impl Into<String>, method: Method, url: impl Into<String>) -> Call {
        Call {
            step: step.into(),
            method,
            url: url.into(),
            headers: Vec::new(),
            body: Body::None,
            auth: true,
        }
    }

    pub fn get(step: impl Into<String>, url: impl Into<String>) -> Call {
        Call::new(step, Method::GET, url)
    }

    pub fn post_json(
        step: impl Into<String>,
        url: impl Into<String>,
        v: &serde_json::Value,
    ) -> Call {
        let mut c = Call::new(step, Method::POST, url);
        c.body = Body::Bytes(v.to_string().into_bytes(), "application/json");
        c
    }

    /// [`Call::post_json`] with another JSON content type (LFS's).
    pub fn post_json_as(
        step: impl Into<String>,
        url: impl Into<String>,
        v: &serde_json::Value,
        content_type: &'static str,
    ) -> Call {
        let mut c = Call::new(step, Method::POST, url);
        c.body = Body::Bytes(v.to_string().into_bytes(), content_type);
        c
    }

    pub fn header(mut self, k: &str, v: impl Into<String>) -> Call {
        self.headers.push((k.to_string(), v.into()));
        self
    }

    pub fn no_auth(mut self) -> Call {
        self.auth = false;
        self
    }
}

/// A whole answer (status, headers, body up to the limit).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

/// What a request has done so far, for the watchdog: when it last moved, and whether
/// its body has been handed over whole.
struct Activity {
    last: Mutex<Instant>,
    streamed: bool,
    sent: AtomicBool,
    /// A local file that could not be read while sending.
    body_error: Mutex<Option<String>>,
}

impl Activity {
    fn new(streamed: bool) -> Arc<Activity> {
        Arc::new(Activity {
            last: Mutex::new(Instant::now()),
            streamed,
            sent: AtomicBool::new(false),
            body_error: Mutex::new(None),
        })
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn idle(&self) -> Duration {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    fn body_error(&self) -> Option<String> {
        self.body_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Reads a [`Body::Pieces`] in chunks, noting each one in the [`Activity`].
struct PieceReader {
    pieces: Arc<Vec<Piece>>,
    /// Bytes still to give: the body counts as sent once all are given (with a
    /// Content-Length, the sender may never ask past the last byte).
    left: u64,
    next: usize,
    file: Option<(std::fs::File, PathBuf, u64, bool)>,
    act: Arc<Activity>,
}

impl PieceReader {
    fn chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        loop {
            if let Some((f, path, left, b64)) = &mut self.file {
                if *left == 0 {
                    self.file = None;
                    continue;
                }
                // A multiple of 3, so that the base64 of the chunks is that of the file.
                let want = (*left).min(if *b64 { 3 * 21_845 } else { 256 << 10 }) as usize;
                let mut buf = vec![0u8; want];
                let mut got = 0;
                while got < want {
                    match f.read(&mut buf[got..]) {
                        Ok(0) => {
                            return Err(format!(
                                "{}: the file became shorter while it was being uploaded; \
                                 upload it again once nothing writes to it",
                                path.display()
                            ));
                        }
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(format!("{}: {e}", path.display())),
                    }
                }
                *left -= want as u64;
                return Ok(Some(if *b64 { base64(&buf).into_bytes() } else { buf }));
            }
            let Some(p) = self.pieces.get(self.next) else {
                return Ok(None);
            };
            self.next += 1;
            match p {
                Piece::Text(t) => return Ok(Some(t.clone())),
                Piece::File {
                    path,
                    offset,
                    len,
                    base64,
                } => {
                    let mut f = std::fs::File::open(path)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    f.seek(std::io::SeekFrom::Start(*offset))
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    self.file = Some((f, path.clone(), *len, *base64));
                }
            }
        }
    }
}

impl Iterator for PieceReader {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.act.touch();
        match self.chunk() {
            Ok(Some(c)) => {
                self.left = self.left.saturating_sub(c.len() as u64);
                if self.left == 0 {
                    self.act.sent.store(true, Ordering::SeqCst);
                }
                Some(Ok(c))
            }
            Ok(None) => {
                self.act.sent.store(true, Ordering::SeqCst);
                None
            }
            Err(msg) => {
                *self
                    .act
                    .body_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
                Some(Err(std::io::Error::other(msg)))
            }
        }
    }
}

/// Run `fut` as long as the request keeps moving: `None` once nothing happened for
/// `limit`.
async fn while_moving<F: std::future::Future>(
    fut: F,
    act: &Activity,
    limit: Duration,
) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    loop {
        let idle = act.idle();
        if idle >= limit {
            return None;
        }
        if let Ok(v) = tokio::time::timeout(limit - idle, fut.as_mut()).await {
            return Some(v);
        }
    }
}

/// The innermost causes of a transport error, without its URL.
fn cause(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut chain = vec![e.to_string()];
    let mut src = std::error::Error::source(&e);
    while let Some(c) = src {
        let t = c.to_string();
        if !chain.iter().any(|s| s.contains(&t)) {
            chain.push(t);
        }
        src = c.source();
    }
    let n = chain.len();
    chain[n.saturating_sub(2)..].join(": ")
}

/// The Hub's HTTP client: one runtime, one connection pool, one timeout.
pub struct Http {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    endpoint: String,
    origin: Url,
    token: Option<String>,
    /// Secrets never to show: the token, a password in the endpoint (and its Basic form).
    secrets: Vec<String>,
    timeout: Duration,
    retries: usize,
}

impl Http {
    /// A client for the Hub at `endpoint`. Errors are phrased for `HF_ENDPOINT`.
    pub fn new(
        endpoint: &str,
        token: Option<String>,
        timeout: Duration,
        retries: usize,
    ) -> Result<Http, String> {
        let shown = redact_url(endpoint);
        let origin = Url::parse(endpoint).map_err(|e| {
            format!(
                "HF_ENDPOINT {shown:?} is not a URL ({e}); set it to e.g. https://huggingface.co"
            )
        })?;
        if !matches!(origin.scheme(), "http" | "https") || origin.host_str().is_none() {
            return Err(format!(
                "HF_ENDPOINT {shown:?} is not an http(s) address; set it to e.g. https://huggingface.co"
            ));
        }
        let mut secrets: Vec<String> = token.iter().cloned().collect();
        if let Some(pw) = origin.password() {
            secrets.push(pw.to_string());
            secrets.push(base64(format!("{}:{pw}", origin.username()).as_bytes()));
        }
        if let Some(t) = &token
            && HeaderValue::from_str(&format!("Bearer {t}")).is_err()
        {
            return Err(
                "the token holds characters an HTTP header cannot carry (a line break or a \
                 control character?); set HF_TOKEN to the token alone"
                    .into(),
            );
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("could not start the HTTP runtime: {e}"))?;
        let client = reqwest::Client::builder()
            .user_agent(format!("lit-claire/{}", env!("CARGO_PKG_VERSION")))
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::limited(10))
            .build()
            .map_err(|e| {
                format!(
                    "could not set up HTTP for {shown}: {}",
                    redact_url(&cause(e))
                )
            })?;
        Ok(Http {
            rt,
            client,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            origin,
            token,
            secrets: secrets.into_iter().filter(|s| s.len() >= 3).collect(),
            timeout,
            retries,
        })
    }

    /// The endpoint, to build URLs (never to print: see [`Http::shown`]).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The endpoint fit to print.
    pub fn shown(&self) -> String {
        redact_url(&self.endpoint)
    }

    /// Words from the server (an error message, a header), fit to print: on one line,
    /// without control characters, without the token or an endpoint password, URLs
    /// redacted, at most a few hundred characters.
    pub fn server_text(&self, s: &str) -> String {
        let mut s = s.to_string();
        for secret in &self.secrets {
            s = s.replace(secret.as_str(), "***");
        }
        let s = redact_url(&s);
        let mut out = String::new();
        for c in s.chars() {
            let c = if c.is_control() { ' ' } else { c };
            if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
                continue;
            }
            if out.chars().count() >= MAX_SHOWN {
                out.push('…');
                break;
            }
            out.push(c);
        }
        out.trim_end().to_string()
    }

    /// Where a request to `url` goes, fit to print: the endpoint for the Hub's own
    /// addresses, else the other server's scheme, host and port.
    fn target(&self, url: &str) -> String {
        if url.starts_with(&self.endpoint) {
            return self.shown();
        }
        match Url::parse(url) {
            Ok(u) => redact_url(&format!(
                "{}://{}{}",
                u.scheme(),
                u.host_str().unwrap_or(""),
                u.port().map(|p| format!(":{p}")).unwrap_or_default()
            )),
            Err(_) => redact_url(url),
        }
    }

    fn failure(&self, call: &Call, kind: Kind) -> Failure {
        Failure {
            step: call.step.clone(),
            to: self.target(&call.url),
            kind,
        }
    }

    fn same_origin(&self, u: &Url) -> bool {
        u.scheme() == self.origin.scheme()
            && u.host_str() == self.origin.host_str()
            && u.port_or_known_default() == self.origin.port_or_known_default()
    }

    fn request(&self, call: &Call, act: &Arc<Activity>) -> Result<reqwest::Request, Kind> {
        let url = Url::parse(&call.url).map_err(|e| {
            Kind::Bad(format!(
                "{} is not a URL ({e})",
                self.server_text(&call.url)
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Kind::Bad(format!(
                "{} is not an http(s) address",
                self.server_text(&call.url)
            )));
        }
        let mut b = self.client.request(call.method.clone(), url.clone());
        for (k, v) in &call.headers {
            let name = HeaderName::from_bytes(k.as_bytes());
            let value = HeaderValue::from_str(v);
            match (name, value) {
                (Ok(n), Ok(v)) => b = b.header(n, v),
                _ => {
                    return Err(Kind::Bad(format!(
                        "header {:?} cannot be sent",
                        self.server_text(k)
                    )));
                }
            }
        }
        match &call.body {
            Body::None => {}
            Body::Bytes(data, ct) => b = b.header(CONTENT_TYPE, *ct).body(data.clone()),
            Body::Pieces(pieces, ct) => {
                let len: u64 = pieces.iter().map(Piece::len).sum();
                if let Some(ct) = ct {
                    b = b.header(CONTENT_TYPE, *ct);
                }
                let reader = PieceReader {
                    pieces: pieces.clone(),
                    left: len,
                    next: 0,
                    file: None,
                    act: act.clone(),
                };
                b = b
                    .header(CONTENT_LENGTH, len)
                    .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                        reader,
                    )));
            }
        }
        let mut req = b
            .build()
            .map_err(|e| Kind::Bad(format!("the request cannot be made: {}", cause(e))))?;
        if call.auth
            && self.same_origin(&url)
            && let Some(t) = &self.token
        {
            let mut v = HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|_| Kind::Bad("the token cannot be sent".into()))?;
            v.set_sensitive(true);
            // Replaces a Basic header made from credentials in the URL.
            req.headers_mut().insert(AUTHORIZATION, v);
        }
        Ok(req)
    }

    /// A transport error as a failure kind.
    fn transport(&self, e: reqwest::Error, act: &Activity) -> Kind {
        if let Some(msg) = act.body_error() {
            Kind::Local(msg)
        } else if e.is_timeout() {
            Kind::Timeout(Wait::Connect, self.timeout)
        } else if e.is_redirect() {
            Kind::Bad("redirected too many times".into())
        } else if e.is_builder() {
            Kind::Bad(format!("the request cannot be made: {}", cause(e)))
        } else {
            Kind::Connect(self.server_text(&cause(e)))
        }
    }

    /// Send the request and wait for the answer's head, as long as things move.
    async fn exchange(&self, call: &Call) -> Result<reqwest::Response, Kind> {
        let act = Activity::new(matches!(call.body, Body::Pieces(..)));
        let req = self.request(call, &act)?;
        match while_moving(self.client.execute(req), &act, self.timeout).await {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => Err(self.transport(e, &act)),
            None if act.streamed && !act.sent.load(Ordering::SeqCst) => {
                Err(Kind::Timeout(Wait::Sending, self.timeout))
            }
            None => Err(Kind::Timeout(Wait::Answer, self.timeout)),
        }
    }

    /// Read a short answer whole: within the timeout, up to `limit` bytes (then
    /// `TooLarge`, or for an error answer, just stop).
    async fn read_short(&self, mut resp: reqwest::Response) -> Result<Reply, Kind> {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let ok = (200..300).contains(&status);
        let limit = if ok { MAX_ANSWER } else { MAX_ERROR_ANSWER };
        if ok && resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(Kind::TooLarge(limit));
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut body = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, resp.chunk()).await {
                Ok(Ok(Some(c))) => {
                    if body.len() + c.len() > limit {
                        if ok {
                            return Err(Kind::TooLarge(limit));
                        }
                        body.extend_from_slice(&c[..limit - body.len()]);
                        break;
                    }
                    body.extend_from_slice(&c);
                }
                Ok(Ok(None)) => break,
                Ok(Err(e)) if ok => return Err(Kind::Connect(self.server_text(&cause(e)))),
                Err(_) if ok => return Err(Kind::Timeout(Wait::Finishing, self.timeout)),
                // An error answer cut short still says what it can.
                _ => break,
            }
        }
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Statuses worth another try: a timeout, a rate limit, a server error.
    fn retry_status(status: u16) -> bool {
        matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
    }

    fn retryable(r: &Result<Reply, Kind>) -> bool {
        match r {
            Err(Kind::Connect(_)) => true,
            Ok(reply) => Self::retry_status(reply.status),
            Err(_) => false,
        }
    }

    /// `once` for `call`, tried again with backoff while `again` says so, up to the
    /// retries allowed; the last result, a failure naming `call`.
    fn with_retries<T>(
        &self,
        call: &Call,
        mut once: impl FnMut() -> Result<T, Kind>,
        again: impl Fn(&Result<T, Kind>) -> bool,
    ) -> Result<T, Failure> {
        let mut attempt = 0;
        loop {
            let r = once();
            if again(&r) && attempt < self.retries {
                self.backoff(attempt);
                attempt += 1;
                continue;
            }
            return r.map_err(|k| self.failure(call, k));
        }
    }

    fn backoff(&self, attempt: usize) {
        let ms = 100u64 << attempt.min(5);
        std::thread::sleep(Duration::from_millis(ms.min(2000)));
    }

    /// Make `call` and read its answer whole (any status; see [`Http::check`]).
    pub fn send(&self, call: &Call) -> Result<Reply, Failure> {
        self.with_retries(
            call,
            || {
                self.rt.block_on(async {
                    let resp = self.exchange(call).await?;
                    self.read_short(resp).await
                })
            },
            Self::retryable,
        )
    }

    /// A non-2xx answer as a failure (with the server's message, cleaned).
    pub fn status_failure(&self, call: &Call, r: &Reply) -> Failure {
        let code = r.header("x-error-code").map(|c| self.server_text(&c));
        let message = r
            .header("x-error-message")
            .or_else(|| {
                let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
                match &v["error"] {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Null => v["message"].as_str().map(str::to_string),
                    other => Some(other.to_string()),
                }
            })
            .or_else(|| {
                let t = String::from_utf8_lossy(&r.body);
                (!t.trim().is_empty()).then(|| t.into_owned())
            })
            .map(|m| self.server_text(&m))
            .filter(|m| !m.is_empty());
        self.failure(
            call,
            Kind::Status {
                status: r.status,
                code,
                message,
            },
        )
    }

    /// Make `call`; a 2xx answer is returned, any other is a failure.
    pub fn check(&self, call: &Call) -> Result<Reply, Failure> {
        let r = self.send(call)?;
        if r.ok() {
            Ok(r)
        } else {
            Err(self.status_failure(call, &r))
        }
    }

    /// The JSON of a 2xx answer to `call`.
    pub fn json<T: serde::de::DeserializeOwned>(&self, call: &Call) -> Result<T, Failure> {
        let r = self.check(call)?;
        self.parse(call, &r)
    }

    /// The JSON of an answer, as `T`.
    pub fn parse<T: serde::de::DeserializeOwned>(
        &self,
        call: &Call,
        r: &Reply,
    ) -> Result<T, Failure> {
        serde_json::from_slice(&r.body).map_err(|e| {
            self.failure(
                call,
                Kind::Bad(format!(
                    "not the JSON expected ({})",
                    self.server_text(&e.to_string())
                )),
            )
        })
    }

    /// A failure of `call` from the caller's own checks on the answer.
    pub fn bad(&self, call: &Call, msg: impl Into<String>) -> Failure {
        self.failure(call, Kind::Bad(msg.into()))
    }

    /// Download the body of `call` into `out` (emptied first, and again before a
    /// retry), checking it against the size the Hub listed (else the answer's
    /// `Content-Length`; one of them must be known) and, when given, its sha256.
    /// Returns the number of bytes written.
    pub fn download(
        &self,
        call: &Call,
        out: &mut std::fs::File,
        out_path: &std::path::Path,
        listed: Option<u64>,
        sha256: Option<&str>,
        progress: &dyn Fn(u64),
    ) -> Result<u64, Failure> {
        self.with_retries(
            call,
            || {
                self.rt
                    .block_on(self.download_once(call, out, out_path, listed, sha256, progress))
            },
            |r| match r {
                Err(Kind::Connect(_)) => true,
                Err(Kind::Status { status, .. }) => Self::retry_status(*status),
                _ => false,
            },
        )
    }

    async fn download_once(
        &self,
        call: &Call,
        out: &mut std::fs::File,
        out_path: &std::path::Path,
        listed: Option<u64>,
        sha256: Option<&str>,
        progress: &dyn Fn(u64),
    ) -> Result<u64, Kind> {
        let local = |e: std::io::Error| Kind::Local(format!("{}: {e}", out_path.display()));
        out.set_len(0).map_err(local)?;
        out.rewind().map_err(local)?;
        let mut resp = self.exchange(call).await?;
        if !resp.status().is_success() {
            let r = self.read_short(resp).await?;
            return match self.status_failure(call, &r).kind {
                k @ Kind::Status { .. } => Err(k),
                _ => unreachable!("status_failure gives a status"),
            };
        }
        let sent = resp.content_length();
        let size = match (listed, sent) {
            (Some(l), Some(s)) if l != s => {
                return Err(Kind::Bad(format!(
                    "the file list gave {l} bytes but the answer holds {s}"
                )));
            }
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => {
                return Err(Kind::Bad(
                    "the file's size was neither listed nor sent (Content-Length)".into(),
                ));
            }
        };
        let mut hash = sha256.map(|_| Sha256::new());
        let mut got = 0u64;
        loop {
            let chunk = match tokio::time::timeout(self.timeout, resp.chunk()).await {
                Err(_) => return Err(Kind::Timeout(Wait::Receiving, self.timeout)),
                Ok(Err(e)) => return Err(Kind::Connect(self.server_text(&cause(e)))),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(c))) => c,
            };
            got += chunk.len() as u64;
            if got > size {
                return Err(Kind::Bad(format!(
                    "it sent more than the {size} bytes the file has"
                )));
            }
            out.write_all(&chunk).map_err(local)?;
            if let Some(h) = &mut hash {
                h.update(&chunk);
            }
            progress(chunk.len() as u64);
        }
        if got < size {
            return Err(Kind::Connect(format!(
                "the transfer ended after {got} of {size} bytes"
            )));
        }
        if let (Some(h), Some(want)) = (hash, sha256) {
            let have: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            if !have.eq_ignore_ascii_case(want) {
                return Err(Kind::Bad(format!(
                    "the file arrived with sha256 {have}, not the {} listed",
                    self.server_text(want)
                )));
            }
        }
        out.flush().map_err(local)?;
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_credentials_and_queries() {
        assert_eq!(redact_url("http://user:pw@host:8/x"), "http://***@host:8/x");
        assert_eq!(
            redact_url("https://huggingface.co"),
            "https://huggingface.co"
        );
        assert_eq!(
            redact_url("see https://a:b@h/p?X-Amz-Signature=s and http://c@d"),
            "see https://***@h/p?… and http://***@d"
        );
        assert_eq!(redact_url("user:pw@host/x"), "***@host/x");
        assert_eq!(redact_url("no url here"), "no url here");
        assert_eq!(redact_url("http://h/p?"), "http://h/p?");
        assert_eq!(redact_url("\"http://u:p@h\""), "\"http://***@h\"");
        assert_eq!(redact_url("http://u:p/w?x#y@h/z"), "http://***@h/z");
        assert_eq!(redact_url("http://h/p#frag"), "http://h/p?…");
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        for n in 0..10u64 {
            assert_eq!(base64(&vec![1; n as usize]).len() as u64, base64_len(n));
        }
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_segment("a b#?"), "a%20b%23%3F");
        assert_eq!(encode_segment("v1.0-x_y~"), "v1.0-x_y~");
    }
}
