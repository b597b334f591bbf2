//! The Hugging Face Hub: `upload` a model folder in one commit, `download` a model
//! snapshot (weights, config and tokenizer only) into `checkpoints/ORG/NAME`.
//!
//! Settings come from the environment, read here once and handed to the `hf-hub`
//! client explicitly:
//!
//! | variable | meaning |
//! |---|---|
//! | `HF_ENDPOINT` | Hub address (default `https://huggingface.co`) |
//! | `HF_TOKEN` | access token; else the file `HF_TOKEN_PATH`, else `$HF_HOME/token` (`HF_HOME` defaults to `~/.cache/huggingface`) |
//! | `HF_HUB_OFFLINE` | `1`/`true`: no network; `download` only accepts a copy already on disk |
//!
//! Nothing is left half-done. An upload is a single commit: the Hub applies all of it
//! or none. A download goes into a temporary folder beside the destination, renamed
//! into place once every file has arrived.
//!
//! Calls made (all under `HF_ENDPOINT`):
//!
//! ```text
//! upload:   GET  /api/models/ORG/NAME                       does it exist?
//!           POST /api/repos/create                           if not
//!           GET  /api/models/ORG/NAME/revision/BRANCH        (--revision) does the branch exist?
//!           POST /api/models/ORG/NAME/branch/BRANCH          if not
//!           POST /api/models/ORG/NAME/preupload/BRANCH       regular or LFS per file
//!           POST /api/models/ORG/NAME/commit/BRANCH          the commit (NDJSON)
//! download: GET  /api/models/ORG/NAME/revision/REV           commit sha + file list
//!           HEAD + GET /ORG/NAME/resolve/SHA/FILE            each file wanted
//! ```

use std::path::{Path, PathBuf};

use hf_hub::repository::CommitOperation;
use hf_hub::{HFClient, HFClientSync, HFError};

use crate::error::{Error, IoContext, Result};

/// The default Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

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
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("token_source", &self.token_source)
            .field("offline", &self.offline)
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
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
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
        }
    }

    fn client(&self) -> Result<HFClientSync> {
        let mut b = HFClient::builder()
            .endpoint(self.endpoint.clone())
            .retry_max_attempts(self.retries)
            .cache_enabled(false)
            .user_agent(format!("lit-claire/{}", env!("CARGO_PKG_VERSION")));
        if let Some(t) = &self.token {
            b = b.token(t.clone());
        }
        b.build_sync()
            .map_err(|e| Error::Usage(format!("HF_ENDPOINT {:?}: {}", self.endpoint, one_line(&e))))
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

/// An error's message and its causes on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s.replace(['\n', '\r'], " ")
}

/// A Hub failure as one line saying what happened and what it left behind.
fn hub_error(e: HFError, hub: &HubConfig, repo: &RepoId, aftermath: &str) -> Error {
    let msg = match &e {
        HFError::AuthRequired { .. } => format!(
            "{} refused the credentials for {repo} (401 Unauthorized); check the token ({})",
            hub.endpoint,
            if hub.token.is_some() {
                hub.token_source.as_str()
            } else {
                "none set: HF_TOKEN"
            }
        ),
        HFError::Forbidden { .. } => format!(
            "{} forbids this on {repo} (403); the token ({}) may lack write access or the repository belong to someone else",
            hub.endpoint, hub.token_source
        ),
        HFError::RepoNotFound { .. } => format!(
            "{repo} not found on {} (404); check the name (private repositories need a token with access)",
            hub.endpoint
        ),
        HFError::RevisionNotFound { revision, .. } => {
            format!(
                "revision {revision} not found in {repo} on {} (404)",
                hub.endpoint
            )
        }
        HFError::EntryNotFound { path, .. } => {
            format!("{path} not found in {repo} on {} (404)", hub.endpoint)
        }
        HFError::Request { .. } => format!("could not talk to {}: {}", hub.endpoint, one_line(&e)),
        _ => format!("{} ({repo}): {}", hub.endpoint, one_line(&e)),
    };
    Error::Msg(format!("{msg}; {aftermath}"))
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
    let client = hub.client()?;
    let handle = client.model(repo.owner.clone(), repo.name.clone());
    let nothing = "nothing was uploaded";
    let exists = handle
        .exists()
        .send()
        .map_err(|e| hub_error(e, hub, repo, nothing))?;
    if !exists {
        client
            .create_repository()
            .repo_id(&repo.to_string())
            .repo_type(hf_hub::repository::RepoTypeModel)
            .private(opts.private)
            .exist_ok(true)
            .send()
            .map_err(|e| hub_error(e, hub, repo, nothing))?;
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
        let has = handle
            .revision_exists()
            .revision(&branch)
            .send()
            .map_err(|e| hub_error(e, hub, repo, &after_create))?;
        if !has {
            handle
                .create_branch()
                .branch(&branch)
                .send()
                .map_err(|e| hub_error(e, hub, repo, &after_create))?;
            eprintln!("created branch {branch} of {repo}");
        }
    }
    let bytes: u64 = files.iter().map(|f| f.2).sum();
    eprintln!(
        "uploading {} files ({:.1} MB) to {repo}@{branch} in one commit",
        files.len(),
        bytes as f64 / 1e6
    );
    let ops = files
        .iter()
        .map(|(rel, path, _)| CommitOperation::add_file(rel.clone(), path.clone()))
        .collect();
    let message = opts.message.clone().unwrap_or_else(|| {
        format!(
            "Upload {} with lit-claire",
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        )
    });
    let commit = handle
        .create_commit()
        .operations(ops)
        .commit_message(message)
        .revision(branch)
        .send()
        .map_err(|e| hub_error(e, hub, repo, &after_create))?;
    Ok(UploadReport {
        files: files.into_iter().map(|f| f.0).collect(),
        bytes,
        created_repo: !exists,
        commit_url: commit.commit_url,
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
    let client = hub.client()?;
    let handle = client.model(repo.owner.clone(), repo.name.clone());
    let rev = revision.unwrap_or("main").to_string();
    let nothing = "nothing was downloaded";
    let info = match handle.info().revision(rev.clone()).send() {
        Ok(i) => i,
        // The Hub answers 404 alike for a missing repository and a missing revision.
        Err(e @ HFError::RevisionNotFound { .. }) => {
            let e = match handle.exists().send() {
                Ok(false) => HFError::RepoNotFound {
                    repo_id: repo.to_string(),
                    context: None,
                },
                _ => e,
            };
            return Err(hub_error(e, hub, repo, nothing));
        }
        Err(e) => return Err(hub_error(e, hub, repo, nothing)),
    };
    let all: Vec<String> = info
        .siblings
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.rfilename)
        .collect();
    let files: Vec<String> = all.iter().filter(|f| wanted_file(f)).cloned().collect();
    if !files.iter().any(|f| f.ends_with(".safetensors")) {
        let why = if all.iter().any(|f| f.ends_with(".bin")) {
            "only PyTorch .bin weights; lit-claire reads safetensors"
        } else {
            "no weights"
        };
        return Err(Error::Msg(format!("{repo}@{rev} has {why}; {nothing}")));
    }
    let at = info.sha.clone().unwrap_or(rev.clone());
    let parent = dest.parent().expect("dest has a parent").to_path_buf();
    std::fs::create_dir_all(&parent).at(&parent)?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.tmp-", repo.name))
        .tempdir_in(&parent)
        .at(&parent)?;
    let bar = crate::hf::shards::progress_bar(files.len() as u64, "downloading");
    let mut bytes = 0;
    for f in &files {
        bar.set_message("downloading");
        let path = handle
            .download_file()
            .filename(f.clone())
            .local_dir(tmp.path().to_path_buf())
            .revision(at.clone())
            .send()
            .map_err(|e| hub_error(e, hub, repo, nothing))?;
        bytes += std::fs::metadata(&path).at(&path)?.len();
        bar.inc(1);
    }
    bar.finish_and_clear();
    crate::hf::export::publish_dir(tmp, &dest)?;
    Ok(DownloadReport {
        dir: dest,
        files,
        bytes,
        sha: info.sha,
    })
}
