//! The Hugging Face Hub: `upload` a model folder in one commit, `download` a model
//! snapshot (weights, config and tokenizer only) into `checkpoints/ORG/NAME`.
//!
//! Settings come from the environment, read here once:
//!
//! | variable | meaning |
//! |---|---|
//! | `HF_ENDPOINT` | Hub address (default `https://huggingface.co`) |
//! | `HF_TOKEN` | access token; else the file `HF_TOKEN_PATH`, else `$HF_HOME/token` (`HF_HOME` defaults to `~/.cache/huggingface`) |
//! | `HF_HUB_OFFLINE` | `1`/`true`: no network; `download` only accepts a copy already on disk |
//!
//! and the timeout from `--timeout` ([`http::DEFAULT_TIMEOUT`] by default).
//!
//! Nothing is left half-done. An upload is a single commit: the Hub applies all of it
//! or none. A download goes into a temporary folder beside the destination, renamed
//! into place once every file has arrived whole (its listed size, and sha256 where
//! listed).
//!
//! Every request goes through [`http::Http`]: bounded in time (`--timeout`) and in the
//! size of what it reads, and every URL shown passes through [`redact_url`]. A failure
//! is one line naming the step (below), the server, and what was left behind.
//!
//! Calls made (all under `HF_ENDPOINT` except LFS storage, which the Hub names):
//!
//! ```text
//! upload:   GET  /api/models/ORG/NAME                       repository check
//!           POST /api/repos/create                           repository creation
//!           GET  /api/models/ORG/NAME/revision/BRANCH        branch check (--revision)
//!           POST /api/models/ORG/NAME/branch/BRANCH          branch creation
//!           POST /api/models/ORG/NAME/preupload/BRANCH       preupload: regular or LFS per file
//!           POST /ORG/NAME.git/info/lfs/objects/batch        LFS batch (LFS files only)
//!           PUT  <storage address>, POST <verify address>    LFS upload / parts / completion / verify
//!           POST /api/models/ORG/NAME/commit/BRANCH          commit (NDJSON, streamed)
//! download: GET  /api/models/ORG/NAME/revision/REV?blobs=true  listing: commit sha, files, sizes
//!           GET  /ORG/NAME/resolve/SHA/FILE                  download of FILE (may redirect)
//! ```

mod commit;
pub mod http;

pub use http::redact_url;

use std::path::{Path, PathBuf};

use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, IoContext, Result};
use http::{Call, Failure, Http, Kind};

/// The default Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// A token file longer than this is not a token file.
const MAX_TOKEN_FILE: u64 = 4096;

/// Where and as whom to talk to the Hub.
#[derive(Clone, PartialEq)]
pub struct HubConfig {
    pub endpoint: String,
    pub token: Option<String>,
    /// Where the token was found, for messages.
    pub token_source: String,
    pub offline: bool,
    /// Retries of a failed request (connection errors, 5xx, 429), with backoff.
    pub retries: usize,
    /// The longest wait on the server: to connect, for an answer, for a transfer to
    /// move (`--timeout`).
    pub timeout: Duration,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &redact_url(&self.endpoint))
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("token_source", &self.token_source)
            .field("offline", &self.offline)
            .field("retries", &self.retries)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HubConfig {
    /// Settings from the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Settings from a variable lookup (tests pass their own).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let endpoint = set("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.into());
        let home = set("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let base = set("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(set("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache")
            });
            base.join("huggingface")
        });
        // A token file is read only if it is a regular file, and only its first
        // [`MAX_TOKEN_FILE`] bytes: a FIFO there would block, /dev/zero never end.
        let read = |p: &Path| {
            use std::io::Read;
            if !std::fs::metadata(p).is_ok_and(|m| m.is_file()) {
                return None;
            }
            let mut text = String::new();
            std::fs::File::open(p)
                .ok()?
                .take(MAX_TOKEN_FILE)
                .read_to_string(&mut text)
                .ok()?;
            let t = text.trim().to_string();
            (!t.is_empty() && (text.len() as u64) < MAX_TOKEN_FILE).then_some(t)
        };
        let token_file = set("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("token"));
        let (token, token_source) = match set("HF_TOKEN") {
            Some(t) => (Some(t.trim().to_string()), "HF_TOKEN".to_string()),
            None => (read(&token_file), token_file.display().to_string()),
        };
        let offline = set("HF_HUB_OFFLINE")
            .map(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
            .unwrap_or(false);
        HubConfig {
            endpoint,
            token,
            token_source,
            offline,
            retries: 3,
            timeout: http::DEFAULT_TIMEOUT,
        }
    }

    /// These settings with the timeout of `--timeout SECONDS`.
    pub fn with_timeout_secs(mut self, secs: f64) -> Result<Self> {
        self.timeout = timeout_from_secs(secs)?;
        Ok(self)
    }

    fn http(&self) -> Result<Http> {
        Http::new(
            &self.endpoint,
            self.token.clone(),
            self.timeout,
            self.retries,
        )
        .map_err(|m| {
            // The token's source, not the token, names the fix.
            let m = m.replace("HF_TOKEN", &self.token_source);
            Error::Usage(m)
        })
    }
}

/// `--timeout SECONDS` as a duration: above 0, at most a day.
pub fn timeout_from_secs(secs: f64) -> Result<Duration> {
    if secs.is_finite() && secs > 0.0 && secs <= 86_400.0 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(Error::Usage(format!(
            "--timeout {secs} must be a number of seconds above 0 and at most 86400 (a day)"
        )))
    }
}

/// A model repository id `ORG/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoId {
    pub owner: String,
    pub name: String,
}

impl std::str::FromStr for RepoId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let ok = |p: &str| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        match s.split_once('/') {
            Some((o, n)) if ok(o) && ok(n) => Ok(RepoId {
                owner: o.into(),
                name: n.into(),
            }),
            _ => Err(Error::Usage(format!(
                "repository id {s:?} must look like ORG/NAME (letters, digits, '-', '_', '.')"
            ))),
        }
    }
}

impl std::fmt::Display for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

/// A failed step as one line: what happened, at which step, and what it left behind.
fn hub_error(f: Failure, hub: &HubConfig, repo: &RepoId, aftermath: &str) -> Error {
    let to = &f.to;
    let step = &f.step;
    let msg = match &f.kind {
        Kind::Status {
            status: 401,
            message,
            ..
        } => format!(
            "{to} refused the credentials for {repo} (401 Unauthorized) at the {step} step{}; \
             check the token ({})",
            said(message),
            if hub.token.is_some() {
                hub.token_source.as_str()
            } else {
                "none set: HF_TOKEN"
            }
        ),
        Kind::Status {
            status: 403,
            message,
            ..
        } => format!(
            "{to} forbids the {step} step on {repo} (403){}; the token ({}) may lack write \
             access or the repository belong to someone else",
            said(message),
            hub.token_source
        ),
        Kind::Status {
            status: 404,
            code,
            message,
        } => match code.as_deref() {
            Some("RevisionNotFound") => {
                format!(
                    "revision not found in {repo} on {to} (404) at the {step} step{}",
                    said(message)
                )
            }
            Some("EntryNotFound") => {
                format!(
                    "file not found in {repo} on {to} (404) at the {step} step{}",
                    said(message)
                )
            }
            _ => format!(
                "{repo} not found on {to} (404) at the {step} step{}; check the name (private \
                 repositories need a token with access)",
                said(message)
            ),
        },
        _ => f.describe(),
    };
    Error::Msg(format!("{msg}; {aftermath}"))
}

/// The server's own words, if any, for a message.
fn said(message: &Option<String>) -> String {
    message
        .as_ref()
        .map(|m| format!(" (the Hub says: {m})"))
        .unwrap_or_default()
}

/// Options of `upload`.
#[derive(Debug, Clone, Default)]
pub struct UploadOptions {
    pub message: Option<String>,
    pub private: bool,
    /// Branch to commit to (default `main`), created from `main` when missing.
    pub revision: Option<String>,
}

/// What `upload` did.
#[derive(Debug, Clone)]
pub struct UploadReport {
    /// Paths in the repository, sorted.
    pub files: Vec<String>,
    pub bytes: u64,
    pub created_repo: bool,
    pub commit_url: Option<String>,
}

/// Files of `dir` to upload (relative, `/`-separated, sorted); hidden entries skipped.
pub fn folder_files(dir: &Path) -> Result<Vec<(String, PathBuf, u64)>> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<(String, PathBuf, u64)>) -> Result<()> {
        for entry in std::fs::read_dir(d).at(d)? {
            let entry = entry.at(d)?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let meta = entry.metadata().at(&path)?;
            if meta.is_dir() {
                walk(root, &path, out)?;
            } else if meta.is_file() {
                let rel = path.strip_prefix(root).expect("under root");
                let rel: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push((rel.join("/"), path.clone(), meta.len()));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Upload every file of `dir` to the model repository `repo` in one commit, creating
/// the repository (and the branch) if missing.
pub fn upload(
    hub: &HubConfig,
    repo: &RepoId,
    dir: &Path,
    opts: &UploadOptions,
) -> Result<UploadReport> {
    if !dir.is_dir() {
        return Err(Error::missing(
            dir,
            "--input-dir must be the folder to upload (e.g. the output of convert-to-hf)",
        ));
    }
    let files = folder_files(dir)?;
    if files.is_empty() {
        return Err(Error::Usage(format!(
            "{} has no files to upload",
            dir.display()
        )));
    }
    if hub.offline {
        return Err(Error::Usage(
            "HF_HUB_OFFLINE is set: upload needs the network; unset it to upload".into(),
        ));
    }
    if hub.token.is_none() {
        return Err(Error::Usage(format!(
            "upload needs a Hugging Face token with write access: set HF_TOKEN or write it to {} \
             (`huggingface-cli login` does); nothing was uploaded",
            hub.token_source
        )));
    }
    let http = hub.http()?;
    let api = format!("{}/api/models/{repo}", http.endpoint());
    let nothing = "nothing was uploaded";
    let fail = |f: Failure, left: &str| hub_error(f, hub, repo, left);
    let check = Call::get("repository check", api.clone());
    let r = http.send(&check).map_err(|e| fail(e, nothing))?;
    let exists = match r.status {
        s if (200..300).contains(&s) => true,
        404 => false,
        _ => return Err(fail(http.status_failure(&check, &r), nothing)),
    };
    if !exists {
        let create = Call::post_json(
            "repository creation",
            format!("{}/api/repos/create", http.endpoint()),
            &serde_json::json!({
                "name": repo.name,
                "organization": repo.owner,
                "private": opts.private,
                "type": "model",
            }),
        );
        let r = http.send(&create).map_err(|e| fail(e, nothing))?;
        // 409: someone created it in between; it is there, which is what matters.
        if !r.ok() && r.status != 409 {
            return Err(fail(http.status_failure(&create, &r), nothing));
        }
        eprintln!(
            "created {}repository {repo}",
            if opts.private { "private " } else { "" }
        );
    }
    let after_create = if exists {
        "nothing was uploaded".to_string()
    } else {
        format!("{repo} was created but holds no files from this upload; run the command again")
    };
    let branch = opts.revision.clone().unwrap_or_else(|| "main".into());
    if branch != "main" {
        let rev = http::encode_segment(&branch);
        let check = Call::get("branch check", format!("{api}/revision/{rev}"));
        let r = http.send(&check).map_err(|e| fail(e, &after_create))?;
        let has = match r.status {
            s if (200..300).contains(&s) => true,
            404 => false,
            _ => return Err(fail(http.status_failure(&check, &r), &after_create)),
        };
        if !has {
            let create = Call::post_json(
                "branch creation",
                format!("{api}/branch/{rev}"),
                &serde_json::json!({}),
            );
            let r = http.send(&create).map_err(|e| fail(e, &after_create))?;
            if !r.ok() && r.status != 409 {
                return Err(fail(http.status_failure(&create, &r), &after_create));
            }
            eprintln!("created branch {branch} of {repo}");
        }
    }
    let bytes: u64 = files.iter().map(|f| f.2).sum();
    eprintln!(
        "uploading {} files ({:.1} MB) to {repo}@{branch} in one commit",
        files.len(),
        bytes as f64 / 1e6
    );
    let message = opts.message.clone().unwrap_or_else(|| {
        format!(
            "Upload {} with lit-claire",
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        )
    });
    let uploads: Vec<commit::Upload> = files
        .iter()
        .map(|(rel, path, size)| commit::Upload {
            path: rel.clone(),
            local: path.clone(),
            size: *size,
        })
        .collect();
    let done = commit::commit(&http, &repo.to_string(), &branch, &uploads, &message)
        .map_err(|e| fail(e, &after_create))?;
    if !done.ignored.is_empty() {
        eprintln!(
            "left out {} file(s) the repository ignores (.gitignore): {}",
            done.ignored.len(),
            done.ignored.join(", ")
        );
    }
    Ok(UploadReport {
        bytes: files
            .iter()
            .filter(|f| done.files.contains(&f.0))
            .map(|f| f.2)
            .sum(),
        files: done.files,
        created_repo: !exists,
        commit_url: done.commit_url,
    })
}

/// Whether `download` fetches a repository file: top-level safetensors, configs and
/// tokenizer files.
pub fn wanted_file(path: &str) -> bool {
    if path.contains('/') {
        return false;
    }
    path.ends_with(".safetensors")
        || path == crate::model::weights::INDEX_FILE
        || [
            "config.json",
            "generation_config.json",
            "adapter_config.json",
        ]
        .contains(&path)
        || crate::hf::export::TOKENIZER_FILES.contains(&path)
}

/// What `download` did.
#[derive(Debug, Clone)]
pub struct DownloadReport {
    pub dir: PathBuf,
    pub files: Vec<String>,
    pub bytes: u64,
    /// The commit downloaded; None when an offline copy was used.
    pub sha: Option<String>,
}

/// Download the weights, configs and tokenizer of `repo` at `revision` (default
/// `main`) into `checkpoints/ORG/NAME`, replacing an older copy only once complete.
pub fn download(
    hub: &HubConfig,
    repo: &RepoId,
    checkpoints: &Path,
    revision: Option<&str>,
) -> Result<DownloadReport> {
    let dest = checkpoints.join(&repo.owner).join(&repo.name);
    if hub.offline {
        if dest.join("config.json").exists() {
            eprintln!(
                "HF_HUB_OFFLINE is set: using the copy already in {}",
                dest.display()
            );
            let files = folder_files(&dest)?;
            return Ok(DownloadReport {
                dir: dest,
                bytes: files.iter().map(|f| f.2).sum(),
                files: files.into_iter().map(|f| f.0).collect(),
                sha: None,
            });
        }
        return Err(Error::Usage(format!(
            "HF_HUB_OFFLINE is set and {} holds no copy of {repo}; unset HF_HUB_OFFLINE to download it",
            dest.display()
        )));
    }
    let http = hub.http()?;
    let api = format!("{}/api/models/{repo}", http.endpoint());
    let rev = revision.unwrap_or("main").to_string();
    let nothing = "nothing was downloaded";
    let fail = |f: Failure| hub_error(f, hub, repo, nothing);
    let listing = Call::get(
        "listing",
        format!("{api}/revision/{}?blobs=true", http::encode_segment(&rev)),
    );
    let r = http.send(&listing).map_err(fail)?;
    if r.status == 404 && r.header("x-error-code").as_deref() != Some("RepoNotFound") {
        // The Hub answers 404 alike for a missing repository and a missing revision.
        let check = Call::get("repository check", api.clone());
        let c = http.send(&check).map_err(fail)?;
        if c.ok() {
            return Err(Error::Msg(format!(
                "revision {rev} not found in {repo} on {} (404); {nothing}",
                http.shown()
            )));
        }
    }
    if !r.ok() {
        return Err(fail(http.status_failure(&listing, &r)));
    }
    let info: Listing = http.parse(&listing, &r).map_err(fail)?;
    let all: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let mut seen = std::collections::BTreeSet::new();
    let files: Vec<&Sibling> = info
        .siblings
        .iter()
        .filter(|f| wanted_file(&f.rfilename) && seen.insert(f.rfilename.as_str()))
        .collect();
    if !files.iter().any(|f| f.rfilename.ends_with(".safetensors")) {
        let why = if all.iter().any(|f| f.ends_with(".bin")) {
            "only PyTorch .bin weights; lit-claire reads safetensors"
        } else {
            "no weights"
        };
        return Err(Error::Msg(format!("{repo}@{rev} has {why}; {nothing}")));
    }
    if let Some(sha) = &info.sha
        && (sha.is_empty() || sha.len() > 64 || !sha.bytes().all(|b| b.is_ascii_alphanumeric()))
    {
        return Err(fail(http.bad(
            &listing,
            format!("{:?} is not a commit id", http.server_text(sha)),
        )));
    }
    let at = info.sha.clone().unwrap_or(rev.clone());
    let at_seg = http::encode_segment(&at);
    let parent = dest.parent().expect("dest has a parent").to_path_buf();
    std::fs::create_dir_all(&parent).at(&parent)?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.tmp-", repo.name))
        .tempdir_in(&parent)
        .at(&parent)?;
    let bar = crate::hf::shards::progress_bar(files.len() as u64, "downloading");
    let mut bytes = 0;
    for f in &files {
        let name = &f.rfilename;
        bar.set_message(format!("downloading {name}"));
        let path = tmp.path().join(name);
        let mut out = std::fs::File::create(&path).at(&path)?;
        let call = Call::get(
            format!("download of {name}"),
            format!(
                "{}/{repo}/resolve/{at_seg}/{}",
                http.endpoint(),
                http::encode_segment(name)
            ),
        );
        let listed = f.lfs.as_ref().map(|l| l.size).or(f.size);
        let sha = f.lfs.as_ref().and_then(|l| l.sha256.as_deref());
        bytes += http
            .download(&call, &mut out, &path, listed, sha, &|_| {})
            .map_err(fail)?;
        out.sync_all().at(&path)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    crate::hf::export::publish_dir(tmp, &dest)?;
    Ok(DownloadReport {
        dir: dest,
        files: files.iter().map(|f| f.rfilename.clone()).collect(),
        bytes,
        sha: info.sha,
    })
}

/// The listing of a revision (`?blobs=true`).
#[derive(Deserialize)]
struct Listing {
    #[serde(default)]
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<LfsInfo>,
}

#[derive(Deserialize)]
struct LfsInfo {
    size: u64,
    #[serde(default)]
    sha256: Option<String>,
}
