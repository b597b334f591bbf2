//! A small stand-in for the Hugging Face Hub on 127.0.0.1, answering exactly the
//! calls `lit-claire upload` and `download` make (see `src/hub.rs`), one request per
//! connection, LFS storage included (basic or multipart uploads). It records every
//! request and every commit, checks the bearer token, and misbehaves on request:
//! it can drop the connection of requests whose path contains a given string, answer
//! them with an injected status or a canned answer, never answer them, never read
//! their body, or answer them with JSON that never ends.
//!
//! Bounded: it listens on 127.0.0.1 only, serves at most [`MAX_CONNECTIONS`]
//! connections and stops accepting after [`LIFETIME`]; a connection is read with a
//! timeout, held unanswered at most [`HOLD`], and an endless answer stops after
//! [`ENDLESS_MAX`] bytes or when the client goes away.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Connections served, at most.
pub const MAX_CONNECTIONS: usize = 400;
/// How long the server accepts connections.
pub const LIFETIME: Duration = Duration::from_secs(300);
/// How long a request is held unanswered, at most.
pub const HOLD: Duration = Duration::from_secs(30);
/// The most bytes of an endless answer.
pub const ENDLESS_MAX: u64 = 4 << 30;
/// The largest request body read.
const MAX_BODY: usize = 512 << 20;

/// A repository: files at the head of each branch.
#[derive(Debug, Clone, Default)]
pub struct Repo {
    pub branches: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    pub private: bool,
}

/// A commit received.
#[derive(Debug, Clone)]
pub struct Commit {
    pub repo: String,
    pub branch: String,
    pub summary: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Default)]
pub struct State {
    pub repos: BTreeMap<String, Repo>,
    pub commits: Vec<Commit>,
    /// `"METHOD /path"` of every request, in order.
    pub requests: Vec<String>,
    /// The token accepted (`Authorization: Bearer <token>`).
    pub token: String,
    /// Requests whose path contains one of these get their connection closed unanswered.
    pub drop_paths: Vec<String>,
    /// Requests whose path contains the string get this status.
    pub fail_paths: Vec<(String, u16)>,
    /// Requests whose path contains the string get this answer: status, headers, body.
    pub canned: Vec<Canned>,
    /// Requests whose path contains one of these are read whole and never answered.
    pub hang_paths: Vec<String>,
    /// Requests whose path contains one of these have their head read, never their
    /// body, and are never answered.
    pub stall_paths: Vec<String>,
    /// Requests whose path contains the string are answered with this status and
    /// JSON that never ends.
    pub endless_paths: Vec<(String, u16)>,
    /// Requests whose path contains one of these are answered 200 with a JSON body
    /// that trickles, a byte at a time, and never ends.
    pub trickle_paths: Vec<String>,
    /// Bytes written in endless answers.
    pub endless_sent: u64,
    /// Files whose path ends with one of these go to LFS storage at preupload.
    pub lfs_suffixes: Vec<String>,
    /// Multipart LFS uploads in chunks of this many bytes (else one PUT).
    pub multipart_chunk: Option<u64>,
    /// LFS objects stored, by sha256.
    pub lfs: BTreeMap<String, Vec<u8>>,
    /// Multipart parts received, by sha256 and part number.
    pub parts: BTreeMap<(String, u64), Vec<u8>>,
    /// `"METHOD /path"` and the `Authorization` header of every request.
    pub auth_seen: Vec<(String, Option<String>)>,
    /// This server's address, for the LFS addresses it hands out.
    pub base: String,
    /// Where LFS uploads are sent instead of this server (another server's address).
    pub lfs_base: Option<String>,
}

/// A canned answer: to requests whose path contains `path`.
#[derive(Debug, Clone)]
pub struct Canned {
    pub path: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

pub struct FakeHub {
    pub url: String,
    pub state: Arc<Mutex<State>>,
}

impl FakeHub {
    /// Start a server on a free loopback port accepting `token`.
    pub fn start(token: &str) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            token: token.into(),
            base: url.clone(),
            ..Default::default()
        }));
        accept_loop(listener, state.clone(), "");
        FakeHub { url, state }
    }

    /// Add a repository whose `main` holds `files`.
    pub fn add_repo(&self, id: &str, files: &[(&str, Vec<u8>)], private: bool) {
        let mut repo = Repo {
            private,
            ..Default::default()
        };
        repo.branches.insert(
            "main".into(),
            files
                .iter()
                .map(|(n, b)| (n.to_string(), b.clone()))
                .collect(),
        );
        self.state.lock().unwrap().repos.insert(id.into(), repo);
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn commits(&self) -> Vec<Commit> {
        self.state.lock().unwrap().commits.clone()
    }

    pub fn drop_requests_to(&self, path_part: &str) {
        self.state.lock().unwrap().drop_paths.push(path_part.into());
    }

    pub fn fail_requests_to(&self, path_part: &str, status: u16) {
        self.state
            .lock()
            .unwrap()
            .fail_paths
            .push((path_part.into(), status));
    }

    /// Answer requests whose path contains `path_part` with exactly this.
    pub fn answer_requests_to(
        &self,
        path_part: &str,
        status: u16,
        headers: &[(&str, &str)],
        body: &[u8],
    ) {
        self.state.lock().unwrap().canned.push(Canned {
            path: path_part.into(),
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_vec(),
        });
    }

    /// Read requests whose path contains `path_part` whole, and never answer.
    pub fn hang_requests_to(&self, path_part: &str) {
        self.state.lock().unwrap().hang_paths.push(path_part.into());
    }

    /// Read the head of requests whose path contains `path_part`, never their body,
    /// and never answer.
    pub fn stall_requests_to(&self, path_part: &str) {
        self.state
            .lock()
            .unwrap()
            .stall_paths
            .push(path_part.into());
    }

    /// Answer requests whose path contains `path_part` with `status` and JSON that
    /// never ends.
    pub fn endless_answers_to(&self, path_part: &str, status: u16) {
        self.state
            .lock()
            .unwrap()
            .endless_paths
            .push((path_part.into(), status));
    }

    /// Answer requests whose path contains `path_part` with 200 and a body that
    /// trickles and never ends.
    pub fn trickle_answers_to(&self, path_part: &str) {
        self.state
            .lock()
            .unwrap()
            .trickle_paths
            .push(path_part.into());
    }

    /// Bytes sent so far in endless answers.
    pub fn endless_sent(&self) -> u64 {
        self.state.lock().unwrap().endless_sent
    }

    /// Send files ending with one of `suffixes` to LFS storage, in parts of `chunk`
    /// bytes if given.
    pub fn use_lfs(&self, suffixes: &[&str], chunk: Option<u64>) {
        let mut st = self.state.lock().unwrap();
        st.lfs_suffixes = suffixes.iter().map(|s| s.to_string()).collect();
        st.multipart_chunk = chunk;
    }

    /// Serve LFS storage from a second address (another port: another origin, which
    /// must never see the token) sharing this server's state; its requests are
    /// recorded as `"storage METHOD /path"`. Returns its URL.
    pub fn add_storage_server(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().unwrap());
        self.state.lock().unwrap().lfs_base = Some(url.clone());
        accept_loop(listener, self.state.clone(), "storage ");
        url
    }

    /// Every `Authorization` header received, with its request.
    pub fn auth_seen(&self) -> Vec<(String, Option<String>)> {
        self.state.lock().unwrap().auth_seen.clone()
    }
}

/// Serve connections to `listener` on threads, within [`MAX_CONNECTIONS`] and
/// [`LIFETIME`]; `tag` prefixes the requests recorded.
fn accept_loop(listener: TcpListener, state: Arc<Mutex<State>>, tag: &'static str) {
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut served = 0;
        while served < MAX_CONNECTIONS && started.elapsed() < LIFETIME {
            match listener.accept() {
                Ok((conn, _)) => {
                    served += 1;
                    let st = state.clone();
                    std::thread::spawn(move || {
                        let _ = serve(conn, &st, tag);
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
}

struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn read_request(stream: &mut BufReader<TcpStream>, with_body: bool) -> std::io::Result<Request> {
    let mut line = String::new();
    stream.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = BTreeMap::new();
    for _ in 0..=200 {
        let mut h = String::new();
        stream.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if !with_body {
    } else if let Some(n) = headers.get("content-length") {
        let n: usize = n.parse().unwrap_or(0);
        if n > MAX_BODY {
            return Err(std::io::Error::other("request body too large"));
        }
        body = vec![0; n];
        stream.read_exact(&mut body)?;
    } else if headers
        .get("transfer-encoding")
        .map(|v| v.contains("chunked"))
        == Some(true)
    {
        loop {
            let mut size = String::new();
            stream.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if body.len() + n > MAX_BODY {
                return Err(std::io::Error::other("request body too large"));
            }
            let mut chunk = vec![0; n + 2];
            stream.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Ok(Request {
        method,
        path,
        headers,
        body,
    })
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn json_response(status: u16, v: Value) -> Response {
    Response {
        status,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: v.to_string().into_bytes(),
    }
}

/// Keep `conn` open unanswered until the client goes away or [`HOLD`] passes;
/// `read` whether to read (and throw away) what the client still sends.
fn hold(conn: &TcpStream, read: bool) {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    while started.elapsed() < HOLD {
        if !read {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        match (&*conn).read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Answer 200 with `{"files": [` and entries that never end, until the client goes
/// away or [`ENDLESS_MAX`] bytes.
fn endless(mut conn: TcpStream, status: u16, state: &Mutex<State>) -> std::io::Result<()> {
    conn.write_all(
        format!(
            "HTTP/1.1 {status} Whatever\r\nConnection: close\r\n\
             Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .as_bytes(),
    )?;
    let item = br#"{"path":"x","uploadMode":"regular","shouldIgnore":false},"#;
    let mut chunk = Vec::new();
    while chunk.len() < (1 << 20) {
        chunk.extend_from_slice(item);
    }
    let head = b"{\"files\": [";
    conn.write_all(format!("{:x}\r\n", head.len()).as_bytes())?;
    conn.write_all(head)?;
    conn.write_all(b"\r\n")?;
    let mut sent = head.len() as u64;
    while sent < ENDLESS_MAX {
        conn.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
        conn.write_all(&chunk)?;
        conn.write_all(b"\r\n")?;
        sent += chunk.len() as u64;
        state.lock().unwrap().endless_sent = sent;
    }
    Ok(())
}

/// Answer 200 with a chunked JSON body sent a byte every 100 ms, for at most [`HOLD`].
fn trickle(mut conn: TcpStream) -> std::io::Result<()> {
    conn.write_all(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n\
          Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n",
    )?;
    let started = Instant::now();
    while started.elapsed() < HOLD {
        std::thread::sleep(Duration::from_millis(100));
        conn.write_all(b"1\r\n \r\n")?;
    }
    Ok(())
}

fn serve(conn: TcpStream, state: &Mutex<State>, tag: &str) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    conn.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    // The head first: a stalled request's body is never read.
    let stall = {
        let mut line = String::new();
        reader.fill_buf()?;
        let peek = String::from_utf8_lossy(reader.buffer()).into_owned();
        line.push_str(peek.lines().next().unwrap_or(""));
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let st = state.lock().unwrap();
        st.stall_paths.iter().any(|p| path.contains(p.as_str()))
    };
    let req = read_request(&mut reader, !stall)?;
    let (drop_it, hang, endless_it, trickle_it) = {
        let mut st = state.lock().unwrap();
        st.requests
            .push(format!("{tag}{} {}", req.method, req.path));
        let auth = req.headers.get("authorization").cloned();
        st.auth_seen
            .push((format!("{tag}{} {}", req.method, req.path), auth));
        let has = |v: &Vec<String>| v.iter().any(|p| req.path.contains(p.as_str()));
        let endless_status = st
            .endless_paths
            .iter()
            .find(|(p, _)| req.path.contains(p.as_str()))
            .map(|e| e.1);
        (
            has(&st.drop_paths),
            has(&st.hang_paths),
            endless_status,
            has(&st.trickle_paths),
        )
    };
    if stall {
        hold(&conn, false);
        return Ok(());
    }
    if hang {
        hold(&conn, true);
        return Ok(());
    }
    if let Some(status) = endless_it {
        return endless(conn, status, state);
    }
    if trickle_it {
        return trickle(conn);
    }
    if drop_it {
        // Close without a word: the client sees the connection reset mid-request.
        drop(reader);
        conn.shutdown(std::net::Shutdown::Both)?;
        return Ok(());
    }
    let resp = answer(&req, state);
    let reason = match resp.status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Other",
    };
    let mut out = conn;
    let mut head = format!("HTTP/1.1 {} {reason}\r\nConnection: close\r\n", resp.status);
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", resp.body.len()));
    out.write_all(head.as_bytes())?;
    if req.method != "HEAD" {
        out.write_all(&resp.body)?;
    }
    out.flush()
}

fn sha_of(files: &BTreeMap<String, Vec<u8>>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (k, v) in files {
        h.update(k.as_bytes());
        h.update(v);
    }
    let d = h.finalize();
    d.iter().take(20).map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn answer(req: &Request, state: &Mutex<State>) -> Response {
    let mut st = state.lock().unwrap();
    if let Some(c) = st
        .canned
        .iter()
        .find(|c| req.path.contains(c.path.as_str()))
    {
        return Response {
            status: c.status,
            headers: c.headers.clone(),
            body: c.body.clone(),
        };
    }
    if let Some((_, status)) = st
        .fail_paths
        .iter()
        .find(|(p, _)| req.path.contains(p.as_str()))
    {
        return json_response(*status, json!({"error": "injected failure"}));
    }
    let path = req.path.split('?').next().unwrap_or("").to_string();
    let seg: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method.as_str(), seg.as_slice()) {
        ("PUT", ["lfs-store", oid]) => {
            if sha256_hex(&req.body) != *oid {
                return json_response(400, json!({"error": "sha256 mismatch"}));
            }
            st.lfs.insert(oid.to_string(), req.body.clone());
            return json_response(200, json!({}));
        }
        ("PUT", ["lfs-part", oid, n]) => {
            let n: u64 = n.parse().unwrap_or(0);
            st.parts.insert((oid.to_string(), n), req.body.clone());
            return Response {
                status: 200,
                headers: vec![("ETag".into(), format!("\"etag-{n}\""))],
                body: vec![],
            };
        }
        ("POST", ["lfs-complete", oid]) => {
            let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            let mut whole = Vec::new();
            for (i, p) in body["parts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                let n = p["partNumber"].as_u64().unwrap_or(0);
                if n != i as u64 + 1 || p["etag"].as_str() != Some(&format!("\"etag-{n}\"")) {
                    return json_response(400, json!({"error": "bad part list"}));
                }
                match st.parts.get(&(oid.to_string(), n)) {
                    Some(b) => whole.extend_from_slice(b),
                    None => return json_response(400, json!({"error": "missing part"})),
                }
            }
            if sha256_hex(&whole) != *oid {
                return json_response(400, json!({"error": "sha256 mismatch"}));
            }
            st.lfs.insert(oid.to_string(), whole);
            return json_response(200, json!({}));
        }
        ("POST", ["lfs-verify", oid]) => {
            return if st.lfs.contains_key(*oid) {
                json_response(200, json!({}))
            } else {
                json_response(404, json!({"error": "object not found"}))
            };
        }
        _ => {}
    }
    let auth = req.headers.get("authorization").cloned();
    let token_ok = auth.as_deref() == Some(format!("Bearer {}", st.token).as_str());
    if auth.is_some() && !token_ok {
        return json_response(
            401,
            json!({"error": "Invalid credentials in Authorization header"}),
        );
    }
    let not_found = || json_response(404, json!({"error": "Repository not found"}));
    match (req.method.as_str(), seg.as_slice()) {
        ("POST", [o, n, "info", "lfs", "objects", "batch"]) if n.ends_with(".git") => {
            if !token_ok {
                return json_response(401, json!({"error": "Unauthorized"}));
            }
            let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            let id = format!("{o}/{}", n.trim_end_matches(".git"));
            if !st.repos.contains_key(&id) {
                return not_found();
            }
            let base = st.lfs_base.clone().unwrap_or(st.base.clone());
            let mut objects = Vec::new();
            for obj in body["objects"].as_array().cloned().unwrap_or_default() {
                let oid = obj["oid"].as_str().unwrap_or("").to_string();
                let size = obj["size"].as_u64().unwrap_or(0);
                if st.lfs.contains_key(&oid) {
                    objects.push(json!({"oid": oid, "size": size}));
                    continue;
                }
                let upload = match st.multipart_chunk {
                    None => {
                        json!({"href": format!("{base}/lfs-store/{oid}"), "header": {"X-Lfs-Test": "1"}})
                    }
                    Some(c) => {
                        let mut header = serde_json::Map::new();
                        header.insert("chunk_size".into(), json!(c.to_string()));
                        for i in 1..=size.div_ceil(c) {
                            header.insert(
                                format!("{i:05}"),
                                json!(format!("{base}/lfs-part/{oid}/{i}")),
                            );
                        }
                        json!({"href": format!("{base}/lfs-complete/{oid}"), "header": header})
                    }
                };
                objects.push(json!({
                    "oid": oid,
                    "size": size,
                    "actions": {
                        "upload": upload,
                        "verify": {"href": format!("{base}/lfs-verify/{oid}"), "header": {}},
                    },
                }));
            }
            let transfer = if st.multipart_chunk.is_some() {
                "multipart"
            } else {
                "basic"
            };
            json_response(200, json!({"transfer": transfer, "objects": objects}))
        }
        ("POST", ["api", "repos", "create"]) => {
            if !token_ok {
                return json_response(401, json!({"error": "Unauthorized"}));
            }
            let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            let id = format!(
                "{}/{}",
                body["organization"].as_str().unwrap_or("me"),
                body["name"].as_str().unwrap_or("")
            );
            if st.repos.contains_key(&id) {
                return json_response(409, json!({"error": "You already created this model repo"}));
            }
            let mut repo = Repo {
                private: body["private"].as_bool().unwrap_or(false),
                ..Default::default()
            };
            repo.branches.insert("main".into(), BTreeMap::new());
            st.repos.insert(id.clone(), repo);
            json_response(200, json!({"url": format!("http://hub/{id}")}))
        }
        ("GET", ["api", "models", o, n, rest @ ..]) => {
            let id = format!("{o}/{n}");
            let Some(repo) = st.repos.get(&id) else {
                return not_found();
            };
            if repo.private && !token_ok {
                return not_found();
            }
            let branch = match rest {
                [] => "main".to_string(),
                ["revision", r] => r.to_string(),
                _ => return not_found(),
            };
            // Commit shas resolve too.
            let files = repo
                .branches
                .get(&branch)
                .or_else(|| repo.branches.values().find(|f| sha_of(f) == branch));
            let Some(files) = files else {
                return json_response(404, json!({"error": "Invalid rev id"}));
            };
            let siblings: Vec<Value> = files
                .iter()
                .map(|(f, b)| {
                    if f.ends_with(".safetensors") {
                        json!({"rfilename": f, "size": b.len(),
                               "lfs": {"sha256": sha256_hex(b), "size": b.len()}})
                    } else {
                        json!({"rfilename": f, "size": b.len()})
                    }
                })
                .collect();
            json_response(
                200,
                json!({"id": id, "sha": sha_of(files), "private": repo.private, "siblings": siblings}),
            )
        }
        ("POST", ["api", "models", o, n, action, branch]) => {
            let id = format!("{o}/{n}");
            if !token_ok {
                return json_response(401, json!({"error": "Unauthorized"}));
            }
            let lfs_store = st.lfs.clone();
            let Some(repo) = st.repos.get_mut(&id) else {
                return not_found();
            };
            match *action {
                "branch" => {
                    let main = repo.branches.get("main").cloned().unwrap_or_default();
                    repo.branches.insert(branch.to_string(), main);
                    json_response(200, json!({}))
                }
                "preupload" => {
                    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
                    let files: Vec<Value> = body["files"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .iter()
                        .map(|f| {
                            let p = f["path"].as_str().unwrap_or("");
                            let lfs = st.lfs_suffixes.iter().any(|s| p.ends_with(s.as_str()));
                            let mode = if lfs { "lfs" } else { "regular" };
                            json!({"path": p, "uploadMode": mode, "shouldIgnore": false})
                        })
                        .collect();
                    json_response(200, json!({"files": files}))
                }
                "commit" => {
                    let Some(head) = repo.branches.get(*branch).cloned() else {
                        return json_response(404, json!({"error": "Invalid rev id"}));
                    };
                    let mut files = head;
                    let mut added = BTreeMap::new();
                    let mut summary = String::new();
                    for line in req.body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                        let v: Value = serde_json::from_slice(line).expect("NDJSON line");
                        match v["key"].as_str() {
                            Some("header") => {
                                summary = v["value"]["summary"].as_str().unwrap_or("").into()
                            }
                            Some("file") => {
                                let p = v["value"]["path"].as_str().unwrap().to_string();
                                let bytes = base64_decode(v["value"]["content"].as_str().unwrap());
                                added.insert(p.clone(), bytes.clone());
                                files.insert(p, bytes);
                            }
                            Some("lfsFile") => {
                                let p = v["value"]["path"].as_str().unwrap().to_string();
                                let oid = v["value"]["oid"].as_str().unwrap_or("");
                                let Some(bytes) = lfs_store.get(oid).cloned() else {
                                    return json_response(
                                        422,
                                        json!({"error": format!("LFS object {oid} missing")}),
                                    );
                                };
                                added.insert(p.clone(), bytes.clone());
                                files.insert(p, bytes);
                            }
                            other => panic!("unexpected commit entry {other:?}"),
                        }
                    }
                    let sha = sha_of(&files);
                    repo.branches.insert(branch.to_string(), files);
                    st.commits.push(Commit {
                        repo: id.clone(),
                        branch: branch.to_string(),
                        summary,
                        files: added,
                    });
                    json_response(
                        200,
                        json!({"commitUrl": format!("http://hub/{id}/commit/{sha}"), "commitOid": sha}),
                    )
                }
                _ => not_found(),
            }
        }
        ("HEAD" | "GET", [o, n, "resolve", rev, file @ ..]) => {
            let id = format!("{o}/{n}");
            let Some(repo) = st.repos.get(&id) else {
                return not_found();
            };
            if repo.private && !token_ok {
                return json_response(401, json!({"error": "Unauthorized"}));
            }
            let files = repo
                .branches
                .get(*rev)
                .or_else(|| repo.branches.values().find(|f| sha_of(f) == *rev));
            let Some(files) = files else {
                return json_response(404, json!({"error": "Invalid rev id"}));
            };
            let name = file.join("/");
            let Some(bytes) = files.get(&name) else {
                return json_response(404, json!({"error": "Entry not found"}));
            };
            let sha = sha_of(files);
            Response {
                status: 200,
                headers: vec![
                    (
                        "ETag".into(),
                        format!(
                            "\"{}\"",
                            sha_of(&BTreeMap::from([(name.clone(), bytes.clone())]))
                        ),
                    ),
                    ("X-Repo-Commit".into(), sha),
                ],
                body: bytes.clone(),
            }
        }
        _ => not_found(),
    }
}

/// Standard base64 (RFC 4648) decoding.
pub fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        let k = chunk.len() - 1;
        for i in 0..k {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}
