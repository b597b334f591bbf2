//! Issue 23, the network cases: `upload` and `download` against Hubs that never
//! answer (7, 8), answer without end, or echo secrets (24), and their neighbours:
//! every request the tool makes (repository and branch checks, preupload, LFS batch,
//! storage, parts, completion and verify, commit; download's listing and files) is
//! bounded in time and size, names its step when it fails, and never shows a
//! password or the token. All against the stand-in Hub of `publish_hub_server.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lit_claire::hub::{self, HubConfig, RepoId, UploadOptions};
use sha2::{Digest, Sha256};

use crate::common::{bin, temp_dir};
use crate::publish_hub_server::FakeHub;

const TOKEN: &str = "hf_hostile_token_4f2a9c";
const PASSWORD: &str = "s3cret-pw-77";

fn config(url: &str, timeout_ms: u64) -> HubConfig {
    HubConfig {
        endpoint: url.to_string(),
        token: Some(TOKEN.into()),
        token_source: "HF_TOKEN".into(),
        offline: false,
        retries: 1,
        timeout: Duration::from_millis(timeout_ms),
    }
}

fn repo() -> RepoId {
    "org/model".parse().unwrap()
}

/// Bytes that are not all alike.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

/// A folder to upload: a config, weights of `weights` bytes, a card.
fn folder(dir: &Path, weights: usize) -> BTreeMap<String, Vec<u8>> {
    let files: BTreeMap<String, Vec<u8>> = [
        ("config.json", b"{\"model_type\": \"llama\"}".to_vec()),
        ("model.safetensors", pattern(weights)),
        ("README.md", b"# card\n".to_vec()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in &files {
        std::fs::write(dir.join(k), v).unwrap();
    }
    files
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn upload(
    cfg: &HubConfig,
    dir: &Path,
    revision: Option<&str>,
) -> Result<hub::UploadReport, String> {
    let opts = UploadOptions {
        revision: revision.map(String::from),
        ..Default::default()
    };
    hub::upload(cfg, &repo(), dir, &opts).map_err(|e| e.to_string())
}

fn one_line(e: &str) {
    assert!(
        !e.contains('\n') && !e.contains('\r'),
        "not one line: {e:?}"
    );
    assert!(
        !e.chars().any(|c| c.is_control()),
        "control characters: {e:?}"
    );
}

/// Nothing in `ck` but an empty `org/` (a download that failed left no trace).
fn nothing_downloaded(ck: &Path) {
    let org = ck.join("org");
    let left: Vec<String> = std::fs::read_dir(&org)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "left behind in {}: {left:?}",
        org.display()
    );
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

fn cli(args: &[&str], endpoint: &str, token: &str) -> Run {
    let home = temp_dir();
    let t = Instant::now();
    let o = Command::new(bin())
        .args(args)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_TOKEN", token)
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    Run {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        took: t.elapsed(),
    }
}

/// The last line of stderr (the error), checked to be the only `error:` line.
fn error_line(r: &Run) -> String {
    assert!(!r.ok, "succeeded: {}", r.stderr);
    let errors: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", r.stderr);
    assert_eq!(
        r.stderr.trim_end().lines().last(),
        Some(errors[0]),
        "{}",
        r.stderr
    );
    errors[0].to_string()
}

// ---------------------------------------------------------------------------------
// 8: a Hub that takes the connection and never answers, at every step
// ---------------------------------------------------------------------------------

#[test]
fn issue23_8_upload_to_a_hub_that_never_answers_fails_at_each_step_naming_it() {
    // (path part held unanswered, step named, repository exists, LFS parts of, branch)
    type Case = (
        &'static str,
        &'static str,
        bool,
        Option<Option<u64>>,
        Option<&'static str>,
    );
    let cases: [Case; 11] = [
        (
            "/api/models/org/model",
            "repository check",
            true,
            None,
            None,
        ),
        (
            "/api/repos/create",
            "repository creation",
            false,
            None,
            None,
        ),
        ("/revision/dev", "branch check", true, None, Some("dev")),
        ("/branch/dev", "branch creation", true, None, Some("dev")),
        ("/preupload/", "preupload", true, None, None),
        ("/objects/batch", "LFS batch", true, Some(None), None),
        (
            "/lfs-store/",
            "LFS upload of model.safetensors",
            true,
            Some(None),
            None,
        ),
        (
            "/lfs-verify/",
            "LFS verify of model.safetensors",
            true,
            Some(None),
            None,
        ),
        (
            "/lfs-part/",
            "LFS upload of model.safetensors (part 1 of 3)",
            true,
            Some(Some(2000)),
            None,
        ),
        (
            "/lfs-complete/",
            "LFS completion of model.safetensors",
            true,
            Some(Some(2000)),
            None,
        ),
        ("/commit/", "commit", true, None, None),
    ];
    let tmp = temp_dir();
    folder(tmp.path(), 5000);
    for (path, step, exists, lfs, branch) in cases {
        let server = FakeHub::start(TOKEN);
        if exists {
            server.add_repo("org/model", &[], false);
        }
        if let Some(chunk) = lfs {
            server.use_lfs(&[".safetensors"], chunk);
        }
        server.hang_requests_to(path);
        let t = Instant::now();
        let e = upload(&config(&server.url, 800), tmp.path(), branch).unwrap_err();
        let took = t.elapsed();
        one_line(&e);
        assert!(
            e.contains(&format!("at the {step} step"))
                || e.contains(&format!("the {step} request")),
            "{step}: {e}"
        );
        assert!(
            e.contains("did not answer") && e.contains("--timeout"),
            "{step}: {e}"
        );
        assert!(e.contains("0.8 s"), "{step}: {e}");
        assert!(
            e.contains("nothing was uploaded") || e.contains("holds no files from this upload"),
            "{step}: {e}"
        );
        // No retry after a timeout: one wait, not several.
        assert!(took < Duration::from_secs(6), "{step}: took {took:?}");
        assert!(server.commits().is_empty(), "{step}");
    }
}

#[test]
fn issue23_8_cli_upload_and_download_with_timeout_end_with_one_line() {
    let server = FakeHub::start(TOKEN);
    server.add_repo("org/model", &[], false);
    server.hang_requests_to("/commit/");
    let src = temp_dir();
    folder(src.path(), 100);
    let dir = src.path().to_str().unwrap();
    let r = cli(
        &["upload", "org/model", "--input-dir", dir, "--timeout", "1"],
        &server.url,
        TOKEN,
    );
    let e = error_line(&r);
    assert!(
        e.contains("commit") && e.contains("within 1 s (--timeout"),
        "{e}"
    );
    assert!(r.took < Duration::from_secs(20), "took {:?}", r.took);
    assert!(server.commits().is_empty());

    let server = FakeHub::start(TOKEN);
    server.add_repo(
        "org/model",
        &[
            ("config.json", b"{}".to_vec()),
            ("model.safetensors", pattern(64)),
        ],
        false,
    );
    server.hang_requests_to("/resolve/");
    let ck = temp_dir();
    let r = cli(
        &[
            "download",
            "--repo-id",
            "org/model",
            "--checkpoint-dir",
            ck.path().to_str().unwrap(),
            "--timeout",
            "0.5",
        ],
        &server.url,
        TOKEN,
    );
    let e = error_line(&r);
    assert!(
        e.contains("download of config.json")
            && e.contains("0.5 s")
            && e.contains("nothing was downloaded"),
        "{e}"
    );
    assert!(r.took < Duration::from_secs(20), "took {:?}", r.took);
    nothing_downloaded(ck.path());
    // --help documents the flag.
    let help = Command::new(bin())
        .args(["upload", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--timeout <SECONDS>"), "{help}");
}

#[test]
fn issue23_8_a_hub_that_stops_reading_an_upload_is_left_after_the_timeout() {
    // Larger than the socket buffers, so the sender really has to wait.
    let big = 24 << 20;
    let tmp = temp_dir();
    folder(tmp.path(), big);
    for (lfs, path, step) in [
        (true, "/lfs-store/", "LFS upload of model.safetensors"),
        (false, "/commit/", "commit"),
    ] {
        let server = FakeHub::start(TOKEN);
        server.add_repo("org/model", &[], false);
        if lfs {
            server.use_lfs(&[".safetensors"], None);
        }
        server.stall_requests_to(path);
        let t = Instant::now();
        let e = upload(&config(&server.url, 1000), tmp.path(), None).unwrap_err();
        one_line(&e);
        assert!(e.contains(step) && e.contains("--timeout"), "{e}");
        assert!(e.contains("stopped taking the data"), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t.elapsed()
        );
        assert!(server.commits().is_empty());
    }
}

#[test]
fn issue23_8_an_answer_that_trickles_without_end_is_cut_at_the_timeout() {
    let server = FakeHub::start(TOKEN);
    server.add_repo("org/model", &[], false);
    server.trickle_answers_to("/preupload/");
    let tmp = temp_dir();
    folder(tmp.path(), 100);
    let t = Instant::now();
    let e = upload(&config(&server.url, 1000), tmp.path(), None).unwrap_err();
    one_line(&e);
    assert!(
        e.contains("did not finish its answer to the preupload request within 1 s"),
        "{e}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn issue23_8_download_from_a_hub_that_never_answers_names_the_step_and_leaves_nothing() {
    for (path, step) in [
        ("/revision/", "listing"),
        ("/model.safetensors", "download of model.safetensors"),
    ] {
        let server = FakeHub::start(TOKEN);
        server.add_repo(
            "org/model",
            &[
                ("config.json", b"{}".to_vec()),
                ("model.safetensors", pattern(4096)),
            ],
            false,
        );
        server.hang_requests_to(path);
        let ck = temp_dir();
        let t = Instant::now();
        let e = hub::download(&config(&server.url, 800), &repo(), ck.path(), None)
            .unwrap_err()
            .to_string();
        one_line(&e);
        assert!(e.contains(step) && e.contains("did not answer"), "{e}");
        assert!(e.contains("nothing was downloaded"), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(6),
            "took {:?}",
            t.elapsed()
        );
        nothing_downloaded(ck.path());
    }
}

#[test]
fn issue23_8_large_lfs_transfers_still_work_with_a_short_timeout() {
    let tmp = temp_dir();
    let files = folder(tmp.path(), 6 << 20);
    for chunk in [None, Some(1 << 20)] {
        let server = FakeHub::start(TOKEN);
        server.use_lfs(&[".safetensors"], chunk);
        let r = upload(&config(&server.url, 1000), tmp.path(), None).unwrap();
        assert_eq!(r.files.len(), 3);
        let commits = server.commits();
        assert_eq!(commits.len(), 1);
        assert_eq!(commits[0].files, files, "chunk {chunk:?}");
        let reqs = server.requests();
        let storage = if chunk.is_some() {
            "PUT /lfs-part/"
        } else {
            "PUT /lfs-store/"
        };
        assert!(reqs.iter().any(|r| r.starts_with(storage)), "{reqs:?}");
        // The weights went to storage, not inside the commit.
        assert!(
            reqs.iter().any(|r| r.starts_with("POST /lfs-verify/")),
            "{reqs:?}"
        );
        // Uploading again: the Hub holds the object, nothing is sent to storage.
        let before = server.requests().len();
        upload(&config(&server.url, 1000), tmp.path(), None).unwrap();
        assert!(
            !server.requests()[before..]
                .iter()
                .any(|r| r.starts_with("PUT ")),
            "{:?}",
            &server.requests()[before..]
        );
        // And back, checked against the listed size and sha256.
        let ck = temp_dir();
        let d = hub::download(&config(&server.url, 1000), &repo(), ck.path(), None).unwrap();
        assert_eq!(
            std::fs::read(d.dir.join("model.safetensors")).unwrap(),
            files["model.safetensors"]
        );
    }
}

// ---------------------------------------------------------------------------------
// 7: answers without end
// ---------------------------------------------------------------------------------

#[test]
fn issue23_7_cli_upload_cuts_an_endless_json_answer_at_the_limit() {
    let server = FakeHub::start(TOKEN);
    server.add_repo("org/model", &[], false);
    server.endless_answers_to("/preupload/", 200);
    let src = temp_dir();
    folder(src.path(), 100);
    let r = cli(
        &[
            "upload",
            "org/model",
            "--input-dir",
            src.path().to_str().unwrap(),
        ],
        &server.url,
        TOKEN,
    );
    let e = error_line(&r);
    assert!(
        e.contains("preupload") && e.contains("larger than 32 MiB"),
        "{e}"
    );
    assert!(e.contains("nothing was uploaded"), "{e}");
    // The client stopped reading at the limit: what the server got out is the limit
    // plus what the socket buffers held.
    let sent = server.endless_sent();
    assert!(sent < 160 << 20, "the server sent {} MiB", sent >> 20);
    assert!(server.commits().is_empty());
}

#[test]
fn issue23_7_every_json_answer_is_bounded_in_size() {
    let tmp = temp_dir();
    folder(tmp.path(), 5000);
    // (path part, step, repository exists, LFS)
    let cases = [
        ("/api/models/org/model", "repository check", true, false),
        ("/api/repos/create", "repository creation", false, false),
        ("/preupload/", "preupload", true, false),
        ("/objects/batch", "LFS batch", true, true),
        (
            "/lfs-verify/",
            "LFS verify of model.safetensors",
            true,
            true,
        ),
        ("/commit/", "commit", true, false),
    ];
    for (path, step, exists, lfs) in cases {
        let server = FakeHub::start(TOKEN);
        if exists {
            server.add_repo("org/model", &[], false);
        }
        if lfs {
            server.use_lfs(&[".safetensors"], None);
        }
        server.endless_answers_to(path, 200);
        let e = upload(&config(&server.url, 20_000), tmp.path(), None).unwrap_err();
        one_line(&e);
        assert!(
            e.contains(&format!("the {step} request is larger than 32 MiB")),
            "{step}: {e}"
        );
        assert!(server.endless_sent() < 160 << 20, "{step}");
    }
    // Download's listing.
    let server = FakeHub::start(TOKEN);
    server.add_repo("org/model", &[("model.safetensors", pattern(10))], false);
    server.endless_answers_to("/revision/", 200);
    let ck = temp_dir();
    let e = hub::download(&config(&server.url, 20_000), &repo(), ck.path(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("listing request is larger than 32 MiB"), "{e}");
    nothing_downloaded(ck.path());
}

#[test]
fn issue23_7_an_endless_error_answer_is_read_only_for_its_message() {
    for status in [404u16, 500] {
        let server = FakeHub::start(TOKEN);
        server.add_repo("org/model", &[], false);
        server.endless_answers_to("/preupload/", status);
        let tmp = temp_dir();
        folder(tmp.path(), 100);
        let t = Instant::now();
        let e = upload(&config(&server.url, 5000), tmp.path(), None).unwrap_err();
        one_line(&e);
        assert!(
            e.contains(&format!("({status}")) || e.contains(&format!("answered {status}")),
            "{e}"
        );
        assert!(e.contains("preupload"), "{e}");
        assert!(
            e.chars().count() < 900,
            "{} characters: {e}",
            e.chars().count()
        );
        assert!(t.elapsed() < Duration::from_secs(15));
        // 64 KiB read per try (two tries for the 500), the rest never pulled.
        assert!(
            server.endless_sent() < 64 << 20,
            "{}",
            server.endless_sent()
        );
    }
}

#[test]
fn issue23_7_download_bodies_are_bounded_by_the_listed_size_and_checked() {
    let weights = pattern(4096);
    let setup = || {
        let server = FakeHub::start(TOKEN);
        server.add_repo(
            "org/model",
            &[
                ("config.json", b"{}".to_vec()),
                ("model.safetensors", weights.clone()),
            ],
            false,
        );
        server
    };
    let run = |server: &FakeHub| {
        let ck = temp_dir();
        let e = hub::download(&config(&server.url, 5000), &repo(), ck.path(), None)
            .unwrap_err()
            .to_string();
        one_line(&e);
        assert!(
            e.contains("download of model.safetensors") && e.contains("nothing was downloaded"),
            "{e}"
        );
        nothing_downloaded(ck.path());
        e
    };
    // A body that never ends.
    let server = setup();
    server.endless_answers_to("/model.safetensors", 200);
    let e = run(&server);
    assert!(e.contains("more than the 4096 bytes"), "{e}");
    assert!(server.endless_sent() < 64 << 20);
    // A body of another size than listed.
    let server = setup();
    server.answer_requests_to("/model.safetensors", 200, &[], &pattern(5000));
    let e = run(&server);
    assert!(
        e.contains("gave 4096 bytes but the answer holds 5000"),
        "{e}"
    );
    // The listed size, other bytes.
    let server = setup();
    let mut other = weights.clone();
    other[7] ^= 1;
    server.answer_requests_to("/model.safetensors", 200, &[], &other);
    let e = run(&server);
    assert!(e.contains("sha256") && e.contains(&sha256(&weights)), "{e}");
}

// ---------------------------------------------------------------------------------
// 24: credentials in HF_ENDPOINT, the token
// ---------------------------------------------------------------------------------

/// `url` (http://127.0.0.1:PORT) with `user:PASSWORD@` in it.
fn with_password(url: &str) -> String {
    url.replacen("http://", &format!("http://user:{PASSWORD}@"), 1)
}

fn no_secret(text: &str) {
    assert!(!text.contains(PASSWORD), "password shown: {text}");
    assert!(!text.contains(TOKEN), "token shown: {text}");
}

#[test]
fn issue23_24_a_password_in_hf_endpoint_is_never_shown() {
    let tmp = temp_dir();
    folder(tmp.path(), 5000);
    let secret_words = format!("Bearer {TOKEN} for http://user:{PASSWORD}@host/x and {PASSWORD}");
    let body = serde_json::json!({ "error": secret_words }).to_string();
    // Each misbehaviour, through the library.
    type Setup<'a> = Box<dyn Fn(&FakeHub) + 'a>;
    let cases: Vec<(&str, Setup)> = vec![
        ("refused", Box::new(|_| {})),
        ("hang", Box::new(|s| s.hang_requests_to("/preupload/"))),
        (
            "401",
            Box::new(|s| s.answer_requests_to("/preupload/", 401, &[], body.as_bytes())),
        ),
        (
            "404",
            Box::new(|s| s.answer_requests_to("/preupload/", 404, &[], body.as_bytes())),
        ),
        (
            "500 with the secrets in a header",
            Box::new(|s| {
                s.answer_requests_to(
                    "/preupload/",
                    500,
                    &[("X-Error-Message", &secret_words)],
                    b"",
                )
            }),
        ),
        (
            "endless",
            Box::new(|s| s.endless_answers_to("/preupload/", 200)),
        ),
        (
            "not JSON",
            Box::new(|s| s.answer_requests_to("/preupload/", 200, &[], secret_words.as_bytes())),
        ),
        ("dropped", Box::new(|s| s.drop_requests_to("/preupload/"))),
    ];
    for (what, setup) in cases {
        let server = FakeHub::start(TOKEN);
        server.add_repo("org/model", &[], false);
        setup(&server);
        let url = if what == "refused" {
            // A port nobody listens on.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let u = format!("http://{}", l.local_addr().unwrap());
            drop(l);
            u
        } else {
            server.url.clone()
        };
        let cfg = config(&with_password(&url), 1000);
        let e = upload(&cfg, tmp.path(), None).unwrap_err();
        one_line(&e);
        no_secret(&e);
        assert!(e.contains("http://***@127.0.0.1:"), "{what}: {e}");
        no_secret(&format!("{cfg:?}"));
    }
    // An endpoint that is not a URL at all.
    for bad in [
        format!("http://user:{PASSWORD}@[::1"),
        format!("user:{PASSWORD}@127.0.0.1:1"),
        format!("ftp://user:{PASSWORD}@127.0.0.1"),
    ] {
        let e = upload(&config(&bad, 1000), tmp.path(), None).unwrap_err();
        one_line(&e);
        no_secret(&e);
        assert!(e.contains("HF_ENDPOINT") && e.contains("***@"), "{e}");
        let ck = temp_dir();
        let e = hub::download(&config(&bad, 1000), &repo(), ck.path(), None)
            .unwrap_err()
            .to_string();
        no_secret(&e);
        assert!(e.contains("HF_ENDPOINT"), "{e}");
    }
}

#[test]
fn issue23_24_cli_upload_and_download_never_print_the_password_or_the_token() {
    let server = FakeHub::start(TOKEN);
    let words = format!("no: Bearer {TOKEN} {PASSWORD}");
    server.answer_requests_to("/revision/", 403, &[("X-Error-Message", &words)], b"");
    server.add_repo("org/model", &[], false);
    let endpoint = with_password(&server.url);
    let src = temp_dir();
    folder(src.path(), 100);
    // A successful upload prints its commit URL: redacted too.
    server.answer_requests_to(
        "/commit/",
        200,
        &[],
        format!(r#"{{"commitUrl": "{endpoint}/org/model/commit/abc?sig={PASSWORD}"}}"#).as_bytes(),
    );
    let up = cli(
        &[
            "upload",
            "org/model",
            "--input-dir",
            src.path().to_str().unwrap(),
        ],
        &endpoint,
        TOKEN,
    );
    assert!(up.ok, "{}", up.stderr);
    no_secret(&up.stdout);
    no_secret(&up.stderr);
    assert!(up.stdout.contains("http://***@127.0.0.1"), "{}", up.stdout);
    // Failures: 403 with the secrets in the server's message; a timeout.
    let ck = temp_dir();
    let ckp = ck.path().to_str().unwrap();
    let down = cli(
        &[
            "download",
            "--repo-id",
            "org/model",
            "--checkpoint-dir",
            ckp,
        ],
        &endpoint,
        TOKEN,
    );
    let e = error_line(&down);
    no_secret(&down.stdout);
    no_secret(&down.stderr);
    assert!(e.contains("403") && e.contains("***"), "{e}");
    server.hang_requests_to("/preupload/");
    let up = cli(
        &[
            "upload",
            "org/model",
            "--input-dir",
            src.path().to_str().unwrap(),
            "--timeout",
            "0.5",
        ],
        &endpoint,
        TOKEN,
    );
    let e = error_line(&up);
    no_secret(&up.stdout);
    no_secret(&up.stderr);
    assert!(
        e.contains("http://***@127.0.0.1") && e.contains("preupload"),
        "{e}"
    );
}

#[test]
fn issue23_24_the_token_goes_to_the_hub_only_never_to_lfs_storage() {
    let tmp = temp_dir();
    let files = folder(tmp.path(), 300_000);
    for chunk in [None, Some(100_000)] {
        let server = FakeHub::start(TOKEN);
        server.use_lfs(&[".safetensors"], chunk);
        let storage = server.add_storage_server();
        let r = upload(&config(&server.url, 5000), tmp.path(), None).unwrap();
        assert_eq!(r.files.len(), 3);
        assert_eq!(server.commits()[0].files, files);
        let seen = server.auth_seen();
        let (to_storage, to_hub): (Vec<_>, Vec<_>) =
            seen.iter().partition(|(r, _)| r.starts_with("storage "));
        assert!(!to_storage.is_empty(), "{storage}: {seen:?}");
        for (req, auth) in &to_storage {
            assert!(auth.is_none(), "{req} got {auth:?}");
        }
        for (req, auth) in &to_hub {
            assert_eq!(
                auth.as_deref(),
                Some(format!("Bearer {TOKEN}").as_str()),
                "{req}"
            );
        }
    }
}

#[test]
fn issue23_24_a_token_that_cannot_be_a_header_is_refused_without_showing_it() {
    let server = FakeHub::start(TOKEN);
    let src = temp_dir();
    folder(src.path(), 100);
    let bad = format!("{TOKEN}\nsecond-line");
    let r = cli(
        &[
            "upload",
            "org/model",
            "--input-dir",
            src.path().to_str().unwrap(),
        ],
        &server.url,
        &bad,
    );
    let e = error_line(&r);
    assert!(e.contains("HF_TOKEN") && e.contains("header"), "{e}");
    no_secret(&r.stderr);
    assert!(server.requests().is_empty());
}

// ---------------------------------------------------------------------------------
// Neighbours: flags, and upload plans that do not add up
// ---------------------------------------------------------------------------------

#[test]
fn issue23_timeout_flag_must_be_a_sensible_number_of_seconds() {
    let server = FakeHub::start(TOKEN);
    let src = temp_dir();
    folder(src.path(), 100);
    let dir = src.path().to_str().unwrap();
    for v in ["0", "-1", "nan", "inf", "1e300", "86401"] {
        let flag = format!("--timeout={v}");
        for args in [
            vec!["upload", "org/model", "--input-dir", dir, flag.as_str()],
            vec!["download", "--repo-id", "org/model", flag.as_str()],
        ] {
            let r = cli(&args, &server.url, TOKEN);
            let e = error_line(&r);
            assert!(e.contains("--timeout") && e.contains("above 0"), "{v}: {e}");
        }
    }
    assert!(server.requests().is_empty());
}

#[test]
fn issue23_upload_plans_that_do_not_add_up_are_errors_not_panics() {
    let tmp = temp_dir();
    let files = folder(tmp.path(), 5000);
    let oid = sha256(&files["model.safetensors"]);
    let batch = |header: serde_json::Value| {
        serde_json::json!({"objects": [{"oid": oid, "size": 5000,
            "actions": {"upload": {"href": "http://127.0.0.1:9/x", "header": header}}}]})
        .to_string()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("/objects/batch", batch(serde_json::json!({"chunk_size": "0", "00001": "http://127.0.0.1:9/p"})), "chunk_size \"0\""),
        ("/objects/batch", batch(serde_json::json!({"chunk_size": "zero"})), "not a positive number"),
        ("/objects/batch", batch(serde_json::json!({"chunk_size": "1000", "00001": "http://127.0.0.1:9/p"})), "1 parts"),
        ("/objects/batch", batch(serde_json::json!({"chunk_size": "4000", "00001": "http://127.0.0.1:9/a", "00003": "http://127.0.0.1:9/b"})), "parts numbered 1..3"),
        (
            "/objects/batch",
            serde_json::json!({"objects": [{"oid": oid, "actions": {"upload": {"href": "file:///etc/passwd"}}}]}).to_string(),
            "not an http(s) address",
        ),
        (
            "/objects/batch",
            serde_json::json!({"objects": [{"oid": oid, "error": {"code": 422, "message": "too big"}}]}).to_string(),
            "refused model.safetensors: 422 too big",
        ),
        ("/objects/batch", r#"{"objects": []}"#.to_string(), "model.safetensors (sha256"),
        ("/preupload/", r#"{"files": []}"#.to_string(), "README.md is missing from the answer"),
        (
            "/preupload/",
            r#"{"files": [{"path": "README.md", "uploadMode": "weird"}]}"#.to_string(),
            "upload mode \"weird\"",
        ),
        ("/preupload/", "[1, 2".to_string(), "not the JSON expected"),
    ];
    for (path, answer, expected) in cases {
        let server = FakeHub::start(TOKEN);
        server.add_repo("org/model", &[], false);
        server.use_lfs(&[".safetensors"], None);
        server.answer_requests_to(path, 200, &[], answer.as_bytes());
        let e = upload(&config(&server.url, 3000), tmp.path(), None).unwrap_err();
        one_line(&e);
        assert!(e.contains(expected), "{expected}: {e}");
        assert!(server.commits().is_empty());
    }
    // A multipart part answered without an ETag.
    let server = FakeHub::start(TOKEN);
    server.add_repo("org/model", &[], false);
    server.use_lfs(&[".safetensors"], Some(2000));
    server.answer_requests_to("/lfs-part/", 200, &[], b"");
    let e = upload(&config(&server.url, 3000), tmp.path(), None).unwrap_err();
    assert!(e.contains("part 1 of 3") && e.contains("no ETag"), "{e}");
    assert!(server.commits().is_empty());
}

#[test]
fn issue23_download_listing_that_does_not_add_up_is_refused() {
    let ck = temp_dir();
    let cases = [
        (
            r#"{"sha": "../../etc", "siblings": [{"rfilename": "model.safetensors", "size": 1}]}"#,
            "is not a commit id",
        ),
        (
            r#"{"sha": "abc", "siblings": [{"rfilename": "model.safetensors"}]}"#,
            "neither listed nor sent",
        ),
        (r#"{"siblings": "nope"}"#, "not the JSON expected"),
    ];
    for (listing, expected) in cases {
        let server = FakeHub::start(TOKEN);
        server.answer_requests_to("/revision/", 200, &[], listing.as_bytes());
        // A file answer without Content-Length (chunked, endless).
        server.endless_answers_to("/resolve/", 200);
        let e = hub::download(&config(&server.url, 3000), &repo(), ck.path(), None)
            .unwrap_err()
            .to_string();
        one_line(&e);
        assert!(e.contains(expected), "{expected}: {e}");
        nothing_downloaded(ck.path());
    }
}

#[test]
fn issue23_a_token_file_that_is_a_device_a_fifo_or_huge_is_not_read_whole() {
    let dir = temp_dir();
    let fifo = dir.path().join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status();
    let huge = dir.path().join("huge");
    std::fs::write(&huge, vec![b'a'; 1 << 20]).unwrap();
    let mut paths = vec![Path::new("/dev/zero").to_path_buf(), huge];
    if made.is_ok_and(|s| s.success()) {
        paths.push(fifo);
    }
    for p in paths {
        let t = Instant::now();
        let p2 = p.display().to_string();
        let c = HubConfig::from_vars(|k| (k == "HF_TOKEN_PATH").then(|| p2.clone()));
        assert_eq!(c.token, None, "{}", p.display());
        assert_eq!(c.token_source, p2);
        assert!(t.elapsed() < Duration::from_secs(2), "{}", p.display());
    }
}

#[test]
fn issue23_a_redirect_loop_is_an_error_naming_the_step() {
    let server = FakeHub::start(TOKEN);
    let target = format!(
        "{}/api/models/org/model/revision/main?blobs=true",
        server.url
    );
    server.answer_requests_to("/revision/", 302, &[("Location", &target)], b"");
    let ck = temp_dir();
    let e = hub::download(&config(&server.url, 3000), &repo(), ck.path(), None)
        .unwrap_err()
        .to_string();
    one_line(&e);
    assert!(
        e.contains("listing") && e.contains("redirected too many times"),
        "{e}"
    );
    assert!(server.requests().len() <= 12, "{:?}", server.requests());
}
