//! One commit of a folder's files to a Hub repository, as the Hub's own client makes
//! it:
//!
//! 1. **preupload**: the Hub says, per file, whether it goes into the commit itself
//!    (`regular`, base64 inside the commit) or to LFS storage (`lfs`), and whether the
//!    repository ignores it.
//! 2. **LFS batch**: for the LFS files, by sha256 and size, the Hub answers where to
//!    send each one (nothing, when it already holds it): one `PUT` (basic transfer), or
//!    numbered parts then a completion call (multipart); then an optional verify call.
//! 3. **commit**: NDJSON, a header line then one line per file: `file` (content in
//!    base64) or `lfsFile` (sha256 only).
//!
//! Bodies are streamed from disk (the commit too), so memory does not grow with the
//! files. Every answer is checked before use: a file the Hub leaves out, an upload
//! plan that does not add up (multipart parts that do not cover the file, a chunk size
//! of 0) is an error naming the step and the file, never a panic.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use reqwest::Method;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::http::{Body, Call, Failure, Http, Piece};

/// Files per preupload and LFS batch request (as the Hub's own client sends).
const BATCH: usize = 256;

/// Git LFS's JSON content type.
const LFS_JSON: &str = "application/vnd.git-lfs+json";

/// The most parts a multipart upload may have.
const MAX_PARTS: u64 = 10_000;

/// A file to commit.
#[derive(Debug, Clone)]
pub struct Upload {
    /// Path in the repository (`/`-separated).
    pub path: String,
    pub local: PathBuf,
    pub size: u64,
}

/// What the commit did.
#[derive(Debug, Clone)]
pub struct Committed {
    /// Files committed, in repository paths.
    pub files: Vec<String>,
    /// Files the repository ignores (its `.gitignore`), left out.
    pub ignored: Vec<String>,
    pub commit_url: Option<String>,
}

#[derive(Deserialize)]
struct PreuploadAnswer {
    files: Vec<PreuploadFile>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PreuploadFile {
    path: String,
    upload_mode: String,
    #[serde(default)]
    should_ignore: bool,
}

#[derive(Deserialize)]
struct BatchAnswer {
    #[serde(default)]
    objects: Vec<BatchObject>,
}

#[derive(Deserialize)]
struct BatchObject {
    oid: String,
    #[serde(default)]
    actions: Option<Actions>,
    #[serde(default)]
    error: Option<BatchError>,
}

#[derive(Deserialize)]
struct BatchError {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct Actions {
    #[serde(default)]
    upload: Option<Action>,
    #[serde(default)]
    verify: Option<Action>,
}

#[derive(Deserialize)]
struct Action {
    href: String,
    #[serde(default)]
    header: BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CommitAnswer {
    #[serde(default)]
    commit_url: Option<String>,
}

/// The first 512 bytes of a file (the Hub decides text or binary from them) and, when
/// `hash`, its sha256 in hex.
fn sample_and_sha(f: &Upload, hash: bool) -> Result<(Vec<u8>, Option<String>), String> {
    let err = |e: std::io::Error| format!("{}: {e}", f.local.display());
    let mut file = std::fs::File::open(&f.local).map_err(err)?;
    let mut sample = Vec::with_capacity(512);
    (&mut file)
        .take(512)
        .read_to_end(&mut sample)
        .map_err(err)?;
    if !hash {
        return Ok((sample, None));
    }
    let mut h = Sha256::new();
    h.update(&sample);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = sample.len() as u64;
    loop {
        let n = file.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
    if total != f.size {
        return Err(format!(
            "{}: the file changed size while being uploaded ({} bytes, then {total}); upload it \
             again once nothing writes to it",
            f.local.display(),
            f.size
        ));
    }
    Ok((
        sample,
        Some(h.finalize().iter().map(|b| format!("{b:02x}")).collect()),
    ))
}

/// Commit `files` to `repo` (`ORG/NAME`) on `branch` (already existing).
pub fn commit(
    http: &Http,
    repo: &str,
    branch: &str,
    files: &[Upload],
    message: &str,
) -> Result<Committed, Failure> {
    let api = format!("{}/api/models/{repo}", http.endpoint());
    let rev = super::http::encode_segment(branch);
    let local = |step: &str, msg: String| Failure {
        step: step.to_string(),
        to: http.shown(),
        kind: super::http::Kind::Local(msg),
    };

    // 1. preupload.
    let mut modes: HashMap<String, (String, bool)> = HashMap::new();
    for batch in files.chunks(BATCH) {
        let mut entries = Vec::new();
        for f in batch {
            let (sample, _) = sample_and_sha(f, false).map_err(|m| local("preupload", m))?;
            entries.push(serde_json::json!({
                "path": f.path,
                "size": f.size,
                "sample": super::http::base64(&sample),
            }));
        }
        let call = Call::post_json(
            "preupload",
            format!("{api}/preupload/{rev}"),
            &serde_json::json!({ "files": entries }),
        );
        let answer: PreuploadAnswer = http.json(&call)?;
        for f in answer.files {
            modes.insert(f.path, (f.upload_mode, f.should_ignore));
        }
        for f in batch {
            match modes.get(&f.path) {
                Some((m, _)) if m == "lfs" || m == "regular" => {}
                Some((m, _)) => {
                    return Err(http.bad(
                        &call,
                        format!(
                            "upload mode {:?} for {} (expected lfs or regular)",
                            http.server_text(m),
                            f.path
                        ),
                    ));
                }
                None => {
                    return Err(http.bad(&call, format!("{} is missing from the answer", f.path)));
                }
            }
        }
    }
    let mut ignored = Vec::new();
    let mut kept: Vec<&Upload> = Vec::new();
    for f in files {
        if modes[&f.path].1 {
            ignored.push(f.path.clone());
        } else {
            kept.push(f);
        }
    }
    // Empty files always go inside the commit.
    let lfs: Vec<&Upload> = kept
        .iter()
        .copied()
        .filter(|f| f.size > 0 && modes[&f.path].0 == "lfs")
        .collect();

    // 2. LFS.
    let mut oids: HashMap<String, String> = HashMap::new();
    for batch in lfs.chunks(BATCH) {
        let mut objects = Vec::new();
        for f in batch {
            let (_, sha) = sample_and_sha(f, true).map_err(|m| local("LFS batch", m))?;
            let sha = sha.expect("hashed");
            objects.push(serde_json::json!({"oid": sha, "size": f.size}));
            oids.insert(f.path.clone(), sha);
        }
        let call = Call::post_json_as(
            "LFS batch",
            format!("{}/{repo}.git/info/lfs/objects/batch", http.endpoint()),
            &serde_json::json!({
                "operation": "upload",
                "transfers": ["basic", "multipart"],
                "objects": objects,
                "hash_algo": "sha256",
                "ref": {"name": branch},
            }),
            LFS_JSON,
        )
        .header("Accept", LFS_JSON);
        let answer: BatchAnswer = http.json(&call)?;
        let mut by_oid: HashMap<String, BatchObject> = answer
            .objects
            .into_iter()
            .map(|o| (o.oid.clone(), o))
            .collect();
        for f in batch {
            let oid = &oids[&f.path];
            let Some(obj) = by_oid.remove(oid) else {
                return Err(http.bad(
                    &call,
                    format!("{} (sha256 {oid}) is missing from the answer", f.path),
                ));
            };
            if let Some(e) = obj.error {
                return Err(http.bad(
                    &call,
                    format!(
                        "the Hub refused {}: {} {}",
                        f.path,
                        e.code.map(|c| c.to_string()).unwrap_or_default(),
                        http.server_text(e.message.as_deref().unwrap_or(""))
                    ),
                ));
            }
            let Some(actions) = obj.actions else {
                continue; // already stored
            };
            if let Some(up) = actions.upload {
                eprintln!(
                    "uploading {} ({:.1} MB) to LFS storage",
                    f.path,
                    f.size as f64 / 1e6
                );
                lfs_upload(http, f, oid, &up)?;
            }
            if let Some(v) = actions.verify {
                let mut call = Call::post_json(
                    format!("LFS verify of {}", f.path),
                    v.href.clone(),
                    &serde_json::json!({"oid": oid, "size": f.size}),
                );
                call.headers = header_values(http, &call, &v.header)?;
                http.check(&call)?;
            }
        }
    }

    // 3. The commit, streamed.
    let mut pieces = vec![line(&serde_json::json!({
        "key": "header",
        "value": {"summary": message, "description": ""},
    }))];
    for f in &kept {
        match oids.get(&f.path) {
            Some(oid) => pieces.push(line(&serde_json::json!({
                "key": "lfsFile",
                "value": {"path": f.path, "algo": "sha256", "oid": oid, "size": f.size},
            }))),
            None => {
                // {"key":"file","value":{"content":"<base64>","path":...,"encoding":"base64"}}
                let path = serde_json::to_string(&f.path).expect("a string");
                pieces.push(Piece::Text(
                    br#"{"key":"file","value":{"content":""#.to_vec(),
                ));
                pieces.push(Piece::File {
                    path: f.local.clone(),
                    offset: 0,
                    len: f.size,
                    base64: true,
                });
                pieces.push(Piece::Text(
                    format!(r#"","path":{path},"encoding":"base64"}}}}"#)
                        .into_bytes()
                        .into_iter()
                        .chain([b'\n'])
                        .collect(),
                ));
            }
        }
    }
    let mut call = Call::new("commit", Method::POST, format!("{api}/commit/{rev}"));
    call.body = Body::Pieces(Arc::new(pieces), Some("application/x-ndjson"));
    let answer: CommitAnswer = http.json(&call)?;
    Ok(Committed {
        files: kept.iter().map(|f| f.path.clone()).collect(),
        ignored,
        commit_url: answer.commit_url.map(|u| http.server_text(&u)),
    })
}

/// One NDJSON line.
fn line(v: &serde_json::Value) -> Piece {
    let mut b = v.to_string().into_bytes();
    b.push(b'\n');
    Piece::Text(b)
}

/// The headers an LFS action asks for, as strings.
fn header_values(
    http: &Http,
    call: &Call,
    h: &BTreeMap<String, serde_json::Value>,
) -> Result<Vec<(String, String)>, Failure> {
    let mut out = Vec::new();
    for (k, v) in h {
        let v = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => {
                return Err(http.bad(
                    call,
                    format!("header {:?} of the plan is not text", http.server_text(k)),
                ));
            }
        };
        out.push((k.clone(), v));
    }
    Ok(out)
}

/// Send one LFS file where `up` says: one PUT, or parts and a completion call.
fn lfs_upload(http: &Http, f: &Upload, oid: &str, up: &Action) -> Result<(), Failure> {
    let plan_call = Call::new(
        format!("LFS upload of {}", f.path),
        Method::PUT,
        up.href.clone(),
    );
    let Some(chunk) = up.header.get("chunk_size") else {
        let mut call = plan_call.no_auth();
        call.headers = header_values(http, &call, &up.header)?;
        call.body = Body::Pieces(
            Arc::new(vec![Piece::File {
                path: f.local.clone(),
                offset: 0,
                len: f.size,
                base64: false,
            }]),
            None,
        );
        http.check(&call)?;
        return Ok(());
    };
    // Multipart: numbered part addresses, each `chunk` bytes (the last one less).
    let chunk = match chunk {
        serde_json::Value::String(s) => s.trim().parse::<u64>().ok(),
        serde_json::Value::Number(n) => n.as_u64(),
        _ => None,
    }
    .filter(|c| *c > 0)
    .ok_or_else(|| {
        http.bad(
            &plan_call,
            format!(
                "chunk_size {} for {} is not a positive number",
                http.server_text(&chunk.to_string()),
                f.path
            ),
        )
    })?;
    let mut parts: Vec<(u64, String)> = Vec::new();
    for (k, v) in &up.header {
        if !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()) {
            let n: u64 = k.parse().unwrap_or(0);
            let Some(href) = v.as_str() else {
                return Err(http.bad(&plan_call, format!("part {k} of {} has no address", f.path)));
            };
            parts.push((n, href.to_string()));
        }
    }
    parts.sort();
    let want = f.size.div_ceil(chunk);
    let numbered = parts
        .iter()
        .enumerate()
        .all(|(i, (n, _))| *n == i as u64 + 1);
    if parts.len() as u64 != want || want > MAX_PARTS || !numbered {
        return Err(http.bad(
            &plan_call,
            format!(
                "{} parts numbered {}..{} for {} ({} bytes in chunks of {chunk} need {want}, \
                 at most {MAX_PARTS})",
                parts.len(),
                parts.first().map(|p| p.0).unwrap_or(0),
                parts.last().map(|p| p.0).unwrap_or(0),
                f.path,
                f.size
            ),
        ));
    }
    let mut etags = Vec::new();
    for (i, (n, href)) in parts.iter().enumerate() {
        let offset = i as u64 * chunk;
        let mut call = Call::new(
            format!("LFS upload of {} (part {n} of {want})", f.path),
            Method::PUT,
            href.clone(),
        )
        .no_auth();
        call.body = Body::Pieces(
            Arc::new(vec![Piece::File {
                path: f.local.clone(),
                offset,
                len: chunk.min(f.size - offset),
                base64: false,
            }]),
            None,
        );
        let r = http.check(&call)?;
        let Some(etag) = r.header("etag").filter(|e| !e.is_empty()) else {
            return Err(http.bad(&call, "the answer has no ETag"));
        };
        etags.push(serde_json::json!({"partNumber": n, "etag": etag}));
    }
    let done = Call::post_json_as(
        format!("LFS completion of {}", f.path),
        up.href.clone(),
        &serde_json::json!({"oid": oid, "parts": etags}),
        LFS_JSON,
    )
    .no_auth()
    .header("Accept", LFS_JSON);
    http.check(&done)?;
    Ok(())
}
