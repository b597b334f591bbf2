//! `upload` and `download` against a stand-in Hub on 127.0.0.1 started by each test.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use lit_claire::hub::{self, HubConfig, RepoId, UploadOptions};

use crate::common::{bin, temp_dir};
use crate::publish_hub_server::FakeHub;

const TOKEN: &str = "hf_test_token";

fn config(hub: &FakeHub, token: Option<&str>) -> HubConfig {
    HubConfig {
        endpoint: hub.url.clone(),
        token: token.map(String::from),
        token_source: "HF_TOKEN".into(),
        offline: false,
        retries: 1,
        timeout: std::time::Duration::from_secs(30),
    }
}

fn repo(id: &str) -> RepoId {
    id.parse().unwrap()
}

/// A folder to upload: weights, config, a nested file and a hidden one.
fn folder(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let files: BTreeMap<String, Vec<u8>> = [
        ("config.json", b"{\"model_type\": \"llama\"}".to_vec()),
        (
            "model.safetensors",
            (0..5000u32).flat_map(|i| i.to_le_bytes()).collect(),
        ),
        ("README.md", b"# card\n".to_vec()),
        ("extra/notes.txt", b"nested".to_vec()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in &files {
        let p = dir.join(k);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, v).unwrap();
    }
    std::fs::write(dir.join(".hidden"), b"skip me").unwrap();
    files
}

fn leftovers(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect(),
        Err(_) => vec![],
    }
}

#[test]
fn upload_creates_the_repo_and_commits_every_file_once() {
    let server = FakeHub::start(TOKEN);
    let tmp = temp_dir();
    let files = folder(tmp.path());
    let opts = UploadOptions {
        message: Some("first".into()),
        private: true,
        revision: None,
    };
    let r = hub::upload(
        &config(&server, Some(TOKEN)),
        &repo("org/model"),
        tmp.path(),
        &opts,
    )
    .unwrap();
    assert!(r.created_repo);
    assert_eq!(r.files, files.keys().cloned().collect::<Vec<_>>());
    let commits = server.commits();
    assert_eq!(commits.len(), 1, "one commit");
    assert_eq!(commits[0].repo, "org/model");
    assert_eq!(commits[0].branch, "main");
    assert_eq!(commits[0].summary, "first");
    assert_eq!(commits[0].files, files, "file list and bytes");
    assert!(server.state.lock().unwrap().repos["org/model"].private);
    let reqs = server.requests();
    assert_eq!(
        reqs,
        [
            "GET /api/models/org/model",
            "POST /api/repos/create",
            "POST /api/models/org/model/preupload/main",
            "POST /api/models/org/model/commit/main",
        ]
    );
}

#[test]
fn upload_to_a_new_branch_of_an_existing_repo() {
    let server = FakeHub::start(TOKEN);
    server.add_repo("org/model", &[("old.txt", b"old".to_vec())], false);
    let tmp = temp_dir();
    let files = folder(tmp.path());
    let opts = UploadOptions {
        revision: Some("dev".into()),
        ..Default::default()
    };
    let r = hub::upload(
        &config(&server, Some(TOKEN)),
        &repo("org/model"),
        tmp.path(),
        &opts,
    )
    .unwrap();
    assert!(!r.created_repo);
    let st = server.state.lock().unwrap();
    let dev = &st.repos["org/model"].branches["dev"];
    assert_eq!(
        dev.len(),
        files.len() + 1,
        "branched from main, then committed"
    );
    assert_eq!(
        st.repos["org/model"].branches["main"].len(),
        1,
        "main untouched"
    );
    assert!(
        st.requests
            .contains(&"POST /api/models/org/model/branch/dev".to_string())
    );
}

#[test]
fn upload_without_token_is_refused_before_any_request() {
    let server = FakeHub::start(TOKEN);
    let tmp = temp_dir();
    folder(tmp.path());
    let mut cfg = config(&server, None);
    cfg.token_source = "/nowhere/token".into();
    let e = hub::upload(
        &cfg,
        &repo("org/model"),
        tmp.path(),
        &UploadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("needs a Hugging Face token") && e.contains("HF_TOKEN"),
        "{e}"
    );
    assert!(!e.contains('\n'));
    assert!(server.requests().is_empty());
}

#[test]
fn upload_with_a_rejected_token_reports_401_and_commits_nothing() {
    let server = FakeHub::start(TOKEN);
    let tmp = temp_dir();
    folder(tmp.path());
    let e = hub::upload(
        &config(&server, Some("hf_wrong")),
        &repo("org/model"),
        tmp.path(),
        &UploadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("401") && e.contains("nothing was uploaded"),
        "{e}"
    );
    assert!(!e.contains('\n'));
    assert!(server.commits().is_empty());
    assert!(server.state.lock().unwrap().repos.is_empty());
}

#[test]
fn upload_with_a_dropped_connection_leaves_no_commit() {
    let server = FakeHub::start(TOKEN);
    server.add_repo("org/model", &[], false);
    server.drop_requests_to("/commit/");
    let tmp = temp_dir();
    folder(tmp.path());
    let e = hub::upload(
        &config(&server, Some(TOKEN)),
        &repo("org/model"),
        tmp.path(),
        &UploadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("could not talk to") && e.contains("nothing was uploaded"),
        "{e}"
    );
    assert!(!e.contains('\n'));
    assert!(server.commits().is_empty());
    assert!(server.state.lock().unwrap().repos["org/model"].branches["main"].is_empty());
    // The commit was tried once and retried once (retries: 1).
    let tries = server
        .requests()
        .iter()
        .filter(|r| r.contains("/commit/"))
        .count();
    assert_eq!(tries, 2);
}

#[test]
fn upload_answered_404_names_the_repo_and_what_was_left() {
    let server = FakeHub::start(TOKEN);
    server.fail_requests_to("/preupload/", 404);
    let tmp = temp_dir();
    folder(tmp.path());
    let e = hub::upload(
        &config(&server, Some(TOKEN)),
        &repo("org/model"),
        tmp.path(),
        &UploadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("org/model not found") && e.contains("404"),
        "{e}"
    );
    assert!(e.contains("was created but holds no files"), "{e}");
    assert!(!e.contains('\n'));
    assert!(server.commits().is_empty());
    let e = hub::upload(
        &config(&server, Some(TOKEN)),
        &repo("org/other"),
        Path::new("/definitely/not/here"),
        &UploadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not found") && e.contains("--input-dir"), "{e}");
}

#[test]
fn download_fetches_weights_config_and_tokenizer_only() {
    let server = FakeHub::start(TOKEN);
    let weights: Vec<u8> = (0..3000u32).flat_map(|i| i.to_le_bytes()).collect();
    server.add_repo(
        "org/model",
        &[
            ("config.json", b"{}".to_vec()),
            ("model.safetensors", weights.clone()),
            ("tokenizer.json", b"{\"model\": {}}".to_vec()),
            ("generation_config.json", b"{}".to_vec()),
            ("README.md", b"card".to_vec()),
            ("pytorch_model.bin", b"pickle".to_vec()),
            ("onnx/model.safetensors", b"nested".to_vec()),
        ],
        false,
    );
    let ck = temp_dir();
    let r = hub::download(&config(&server, None), &repo("org/model"), ck.path(), None).unwrap();
    let dest = ck.path().join("org/model");
    assert_eq!(r.dir, dest);
    let mut got: Vec<String> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json"
        ]
    );
    assert_eq!(
        std::fs::read(dest.join("model.safetensors")).unwrap(),
        weights
    );
    assert!(leftovers(&ck.path().join("org")).is_empty());
    // Files were fetched at the commit the revision resolved to.
    let reqs = server.requests();
    assert_eq!(
        reqs[0],
        "GET /api/models/org/model/revision/main?blobs=true"
    );
    assert!(
        reqs.iter()
            .any(|r| r.starts_with("GET /org/model/resolve/") && !r.contains("/main/"))
    );
}

#[test]
fn download_of_a_missing_repo_reports_404_and_writes_nothing() {
    let server = FakeHub::start(TOKEN);
    let ck = temp_dir();
    let e = hub::download(
        &config(&server, Some(TOKEN)),
        &repo("org/absent"),
        ck.path(),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("org/absent not found") && e.contains("404"),
        "{e}"
    );
    assert!(std::fs::read_dir(ck.path()).unwrap().next().is_none());
}

#[test]
fn download_of_a_private_repo_with_a_bad_token_reports_401() {
    let server = FakeHub::start(TOKEN);
    server.add_repo("org/private", &[("model.safetensors", vec![1, 2, 3])], true);
    let ck = temp_dir();
    let e = hub::download(
        &config(&server, Some("hf_wrong")),
        &repo("org/private"),
        ck.path(),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("401") && e.contains("nothing was downloaded"),
        "{e}"
    );
    assert!(std::fs::read_dir(ck.path()).unwrap().next().is_none());
}

#[test]
fn download_with_a_dropped_connection_leaves_no_partial_folder() {
    let server = FakeHub::start(TOKEN);
    server.add_repo(
        "org/model",
        &[
            ("config.json", b"{}".to_vec()),
            ("model.safetensors", vec![7; 4096]),
        ],
        false,
    );
    server.drop_requests_to("/model.safetensors");
    let ck = temp_dir();
    let e = hub::download(&config(&server, None), &repo("org/model"), ck.path(), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("could not talk to") && e.contains("nothing was downloaded"),
        "{e}"
    );
    assert!(!ck.path().join("org/model").exists());
    assert!(
        leftovers(&ck.path().join("org")).is_empty(),
        "{:?}",
        leftovers(&ck.path().join("org"))
    );
}

#[test]
fn download_refuses_repos_without_safetensors() {
    let server = FakeHub::start(TOKEN);
    server.add_repo(
        "org/old",
        &[
            ("config.json", b"{}".to_vec()),
            ("pytorch_model.bin", vec![1]),
        ],
        false,
    );
    let ck = temp_dir();
    let e = hub::download(&config(&server, None), &repo("org/old"), ck.path(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("only PyTorch .bin weights"), "{e}");
}

#[test]
fn offline_download_refuses_or_uses_the_local_copy() {
    let server = FakeHub::start(TOKEN);
    let ck = temp_dir();
    let mut cfg = config(&server, None);
    cfg.offline = true;
    let e = hub::download(&cfg, &repo("org/model"), ck.path(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("HF_HUB_OFFLINE") && e.contains("unset"), "{e}");
    let dest = ck.path().join("org/model");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(dest.join("config.json"), b"{}").unwrap();
    let r = hub::download(&cfg, &repo("org/model"), ck.path(), None).unwrap();
    assert_eq!(r.files, ["config.json"]);
    assert!(r.sha.is_none());
    assert!(server.requests().is_empty(), "offline means no request");
}

#[test]
fn hub_settings_come_from_the_environment_variables() {
    let home = temp_dir();
    std::fs::write(home.path().join("token"), "hf_from_file\n").unwrap();
    let vars = |pairs: Vec<(&'static str, String)>| {
        move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    };
    let h = home.path().display().to_string();
    let c = HubConfig::from_vars(vars(vec![("HF_HOME", h.clone())]));
    assert_eq!(c.endpoint, "https://huggingface.co");
    assert_eq!(c.token.as_deref(), Some("hf_from_file"));
    assert!(!c.offline);
    let c = HubConfig::from_vars(vars(vec![
        ("HF_HOME", h.clone()),
        ("HF_TOKEN", "hf_env".into()),
        ("HF_ENDPOINT", "http://127.0.0.1:9/".into()),
        ("HF_HUB_OFFLINE", "1".into()),
    ]));
    assert_eq!(c.token.as_deref(), Some("hf_env"));
    assert_eq!(c.endpoint, "http://127.0.0.1:9");
    assert!(c.offline);
    let c = HubConfig::from_vars(vars(vec![("HOME", "/nonexistent-home".into())]));
    assert_eq!(c.token, None);
    assert!(
        c.token_source.ends_with(".cache/huggingface/token"),
        "{}",
        c.token_source
    );
    assert!("no-slash".parse::<RepoId>().is_err());
    assert!("a/b/c".parse::<RepoId>().is_err());
}

#[test]
fn cli_upload_then_download_round_trip() {
    let server = FakeHub::start(TOKEN);
    let src = temp_dir();
    let files = folder(src.path());
    let home = temp_dir();
    let run = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .env("HF_ENDPOINT", &server.url)
            .env("HF_TOKEN", TOKEN)
            .env("HF_HOME", home.path())
            .env_remove("HF_HUB_OFFLINE")
            .output()
            .unwrap()
    };
    let up = run(&[
        "upload",
        "org/model",
        "--input-dir",
        src.path().to_str().unwrap(),
        "--message",
        "m",
    ]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert_eq!(server.commits()[0].files, files);
    let ck = temp_dir();
    let down = run(&[
        "download",
        "--repo-id",
        "org/model",
        "--checkpoint-dir",
        ck.path().to_str().unwrap(),
    ]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let dest = ck.path().join("org/model");
    assert_eq!(
        String::from_utf8_lossy(&down.stdout).trim(),
        dest.display().to_string()
    );
    assert_eq!(
        std::fs::read(dest.join("model.safetensors")).unwrap(),
        files["model.safetensors"]
    );
    assert!(!dest.join("README.md").exists() && !dest.join("extra").exists());
    // A missing token through the CLI: one line on stderr, non-zero exit.
    let out = Command::new(bin())
        .args([
            "upload",
            "org/model",
            "--input-dir",
            src.path().to_str().unwrap(),
        ])
        .env("HF_ENDPOINT", &server.url)
        .env_remove("HF_TOKEN")
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn convert_to_hf_with_repo_id_uploads_the_converted_folder() {
    let server = FakeHub::start(TOKEN);
    let tmp = temp_dir();
    let out = tmp.path().join("hf");
    let home = temp_dir();
    let o = Command::new(bin())
        .arg("convert-to-hf")
        .arg("--input-path")
        .arg(crate::common::reference_dir("llama"))
        .arg("--output-dir")
        .arg(&out)
        .args(["--repo-id", "org/llama-fr"])
        .env("HF_ENDPOINT", &server.url)
        .env("HF_TOKEN", TOKEN)
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let commits = server.commits();
    assert_eq!(commits.len(), 1);
    let names: Vec<&str> = commits[0].files.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "README.md",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    assert_eq!(
        commits[0].files["model.safetensors"],
        std::fs::read(out.join("model.safetensors")).unwrap()
    );
    let card = String::from_utf8(commits[0].files["README.md"].clone()).unwrap();
    assert!(card.contains("from_pretrained(\"org/llama-fr\""), "{card}");
}
