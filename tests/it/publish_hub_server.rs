//! A small stand-in for the Hugging Face Hub on 127.0.0.1, answering exactly the
//! calls `lit-claire upload` and `download` make (see `src/hub.rs`), one request per
//! connection. It records every request and every commit, checks the bearer token,
//! and can drop the connection of requests whose path contains a given string.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

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
            ..Default::default()
        }));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &st);
                });
            }
        });
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
}

struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn read_request(stream: &mut BufReader<TcpStream>) -> std::io::Result<Request> {
    let mut line = String::new();
    stream.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = BTreeMap::new();
    loop {
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
    if let Some(n) = headers.get("content-length") {
        body = vec![0; n.parse().unwrap_or(0)];
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

fn serve(conn: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let req = read_request(&mut reader)?;
    let drop_it = {
        let mut st = state.lock().unwrap();
        st.requests.push(format!("{} {}", req.method, req.path));
        st.drop_paths.iter().any(|p| req.path.contains(p.as_str()))
    };
    if drop_it {
        // Close without a word: the client sees the connection reset mid-request.
        drop(reader);
        conn.shutdown(std::net::Shutdown::Both)?;
        return Ok(());
    }
    let resp = answer(&req, state);
    let reason = match resp.status {
        200 => "OK",
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

fn answer(req: &Request, state: &Mutex<State>) -> Response {
    let mut st = state.lock().unwrap();
    if let Some((_, status)) = st
        .fail_paths
        .iter()
        .find(|(p, _)| req.path.contains(p.as_str()))
    {
        return json_response(*status, json!({"error": "injected failure"}));
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
    let path = req.path.split('?').next().unwrap_or("").to_string();
    let seg: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method.as_str(), seg.as_slice()) {
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
            let siblings: Vec<Value> = files.keys().map(|f| json!({"rfilename": f})).collect();
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
                        .map(|f| json!({"path": f["path"], "uploadMode": "regular", "shouldIgnore": false}))
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
