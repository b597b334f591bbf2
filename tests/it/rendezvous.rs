//! Rendezvous of data-parallel ranks over real TCP on 127.0.0.1: threads of this test,
//! and real processes (`lit-claire dist-check` started as torchrun would).

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use lit_claire::strategy::env::{JobSecret, SecretSource};
use lit_claire::strategy::rendezvous::Rendezvous;

use crate::common::bin;

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rdv(port: u16, rank: usize, world_size: usize, timeout_ms: u64) -> Rendezvous {
    Rendezvous {
        addr: "127.0.0.1".into(),
        port,
        port_source: "MASTER_PORT".into(),
        rank,
        world_size,
        timeout: Duration::from_millis(timeout_ms),
        secret: JobSecret::none(),
    }
}

/// Run `ranks` (rank, world size) as threads, rank 0 started last; every result in order.
fn run(port: u16, ranks: &[(usize, usize)], timeout_ms: u64) -> Vec<Result<Vec<u8>, String>> {
    let payload: Vec<u8> = (0..128u8).map(|b| b.wrapping_mul(7)).collect();
    let handles: Vec<_> = ranks
        .iter()
        .map(|&(rank, world)| {
            let payload = payload.clone();
            thread::spawn(move || {
                if rank == 0 {
                    // The others are already retrying: rank 0 may start later.
                    thread::sleep(Duration::from_millis(300));
                }
                let own = (rank == 0).then_some(&payload[..]);
                rdv(port, rank, world, timeout_ms)
                    .share(own)
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn every_rank_gets_rank_zeros_payload() {
    let port = free_port();
    let results = run(port, &[(1, 4), (2, 4), (3, 4), (0, 4)], 10_000);
    let want: Vec<u8> = (0..128u8).map(|b| b.wrapping_mul(7)).collect();
    for r in results {
        assert_eq!(r.unwrap(), want);
    }
}

#[test]
fn a_missing_rank_is_named_on_every_rank() {
    let port = free_port();
    let start = Instant::now();
    let results = run(port, &[(1, 4), (3, 4), (0, 4)], 800);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    for r in &results {
        let err = r.as_ref().unwrap_err();
        assert!(err.contains("rank 2 of 4 did not arrive"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
    assert!(
        results[0]
            .as_ref()
            .unwrap_err()
            .starts_with("rank 1: rank 0 stopped")
    );
}

#[test]
fn an_absent_rank_zero_is_named() {
    let port = free_port();
    let start = Instant::now();
    let err = rdv(port, 1, 2, 500).share(None).unwrap_err().to_string();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(
        err.contains(&format!(
            "rank 1: rank 0 was not reachable at 127.0.0.1:{port}"
        )),
        "{err}"
    );
}

#[test]
fn a_bad_world_size_is_refused() {
    let port = free_port();
    let results = run(port, &[(1, 3), (0, 2)], 10_000);
    for r in &results {
        let err = r.as_ref().unwrap_err();
        assert!(
            err.contains("rank 1") && err.contains("has world size 3, rank 0 has 2"),
            "{err}"
        );
    }
}

#[test]
fn a_duplicate_rank_is_refused() {
    let port = free_port();
    let results = run(port, &[(1, 3), (1, 3), (0, 3)], 10_000);
    for r in &results {
        let err = r.as_ref().unwrap_err();
        assert!(err.contains("two processes say they are rank 1"), "{err}");
    }
}

/// Issue 26: a client that speaks the protocol but carries another job's secret is
/// refused with the reason, even when it claims a rank the real one then takes, and
/// the real ranks still meet.
#[test]
fn a_stranger_with_another_jobs_secret_is_refused_and_the_real_ranks_meet() {
    let port = free_port();
    let ours = JobSecret::new(SecretSource::SlurmJobId, "4242");
    let with = |rank: usize, secret: &JobSecret| Rendezvous {
        secret: secret.clone(),
        ..rdv(port, rank, 3, 10_000)
    };
    let payload = b"nccl id".to_vec();
    let zero = {
        let (r, p) = (with(0, &ours), payload.clone());
        thread::spawn(move || r.share(Some(&p)).map_err(|e| e.to_string()))
    };
    // The stranger comes first and claims rank 1, with another job's id.
    let other_job = JobSecret::new(SecretSource::SlurmJobId, "4243");
    let stranger = with(1, &other_job).share(None).unwrap_err().to_string();
    assert!(
        stranger.starts_with(&format!("rank 1: rank 0 at 127.0.0.1:{port} refused this process: its job secret (from SLURM_JOB_ID) is not that of rank 0's job")),
        "{stranger}"
    );
    assert!(!stranger.contains('\n'), "{stranger}");
    // No secret at all is refused too.
    let none = with(2, &JobSecret::none())
        .share(None)
        .unwrap_err()
        .to_string();
    assert!(none.contains("(from no job variable)"), "{none}");
    let real: Vec<_> = [1, 2]
        .into_iter()
        .map(|r| {
            let rdv = with(r, &ours);
            thread::spawn(move || rdv.share(None).map_err(|e| e.to_string()))
        })
        .collect();
    for r in real {
        assert_eq!(r.join().unwrap().unwrap(), payload);
    }
    assert_eq!(zero.join().unwrap().unwrap(), payload);
}

/// Issue 26, with real processes: rank 0 logs one line for the stranger (a process
/// of another job) and the job's two ranks still meet; the stranger exits with the
/// reason.
#[test]
fn a_stranger_process_is_refused_and_logged_on_rank_zeros_stderr() {
    let port = free_port();
    let secret = |c: Command, s: &str| -> Command {
        let mut c = c;
        c.env("LIT_CLAIRE_JOB_SECRET", s);
        c
    };
    let zero = secret(dist_check_command(port, 0, 2, 20, &[]), "job-a")
        .spawn()
        .unwrap();
    let stranger = secret(dist_check_command(port, 1, 2, 20, &[]), "job-b")
        .output()
        .unwrap();
    assert!(!stranger.status.success());
    let err = String::from_utf8_lossy(&stranger.stderr);
    assert!(
        err.contains("refused this process: its job secret (from LIT_CLAIRE_JOB_SECRET)"),
        "{err}"
    );
    let one = secret(dist_check_command(port, 1, 2, 20, &[]), "job-a")
        .output()
        .unwrap();
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    let zero = zero.wait_with_output().unwrap();
    assert!(zero.status.success());
    let log = String::from_utf8_lossy(&zero.stderr);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].starts_with("warning: rendezvous at ")
            && lines[0].contains("which says it is rank 1 of 2: its job secret (from LIT_CLAIRE_JOB_SECRET) is not this job's")
            && lines[0].ends_with("still waiting for the real rank"),
        "{log}"
    );
}

/// `lit-claire dist-check` as torchrun would start `world` of them.
fn dist_check_process(
    port: u16,
    rank: usize,
    world: usize,
    timeout_s: u32,
    extra: &[&str],
) -> std::process::Child {
    dist_check_command(port, rank, world, timeout_s, extra)
        .spawn()
        .unwrap()
}

/// The command of [`dist_check_process`], not started.
fn dist_check_command(
    port: u16,
    rank: usize,
    world: usize,
    timeout_s: u32,
    extra: &[&str],
) -> Command {
    let mut c = Command::new(bin());
    c.args([
        "dist-check",
        "--device",
        "cpu",
        "--timeout",
        &timeout_s.to_string(),
    ])
    .args(extra)
    .env("RANK", rank.to_string())
    .env("WORLD_SIZE", world.to_string())
    .env("LOCAL_RANK", rank.to_string())
    .env("LOCAL_WORLD_SIZE", world.to_string())
    .env("MASTER_ADDR", "127.0.0.1")
    .env("MASTER_PORT", port.to_string())
    .env_remove("LIT_CLAIRE_JOB_SECRET")
    .env_remove("SLURM_JOB_ID")
    .env_remove("TORCHELASTIC_RUN_ID")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

#[test]
fn processes_meet_through_the_cli() {
    let port = free_port();
    let world = 3;
    let children: Vec<_> = (0..world)
        .rev()
        .map(|rank| dist_check_process(port, rank, world, 20, &[]))
        .collect();
    let mut digests = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(report["launcher"], "torchrun");
        assert_eq!(report["world_size"], world);
        assert!(
            report["checks"].to_string().contains("desync check"),
            "{report}"
        );
        digests.push(report["shared_digest"].as_str().unwrap().to_string());
    }
    assert_eq!(digests[0].len(), 16);
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");
}

/// Under torchrun, the agent's own store listens on `MASTER_PORT` for as long as the
/// workers run (`TORCHELASTIC_USE_AGENT_STORE=True`): the processes must meet on
/// another port, the next one, all of them alike, and not fail with "address in use".
#[test]
fn processes_meet_beside_torchruns_store_on_master_port() {
    // torchrun's store: something listening on MASTER_PORT, with the next port free.
    let (store, port) = loop {
        let store = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = store.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("0.0.0.0", port + 1)).is_ok() {
            break (store, port);
        }
    };
    let world = 2;
    let children: Vec<_> = (0..world)
        .map(|rank| {
            dist_check_command(port, rank, world, 20, &[])
                .env("TORCHELASTIC_USE_AGENT_STORE", "True")
                .env("TORCHELASTIC_RUN_ID", "agent-store-test")
                .env_remove("LIT_CLAIRE_PORT")
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        assert_eq!(
            report["master"],
            format!("127.0.0.1:{}", port + 1),
            "{report}"
        );
    }
    drop(store);
}

/// Without torchrun's store variable, a taken `MASTER_PORT` is refused in one line that
/// names where the port came from and the variable that picks another.
#[test]
fn a_taken_master_port_names_the_variable_to_set() {
    let store = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = store.local_addr().unwrap().port();
    let out = dist_check_command(port, 0, 2, 5, &[])
        .env_remove("TORCHELASTIC_USE_AGENT_STORE")
        .env_remove("LIT_CLAIRE_PORT")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on port {port} (MASTER_PORT)"))
            && stderr.contains("set LIT_CLAIRE_PORT to a free port"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    drop(store);
}

#[test]
fn a_missing_process_times_out_with_its_rank() {
    let port = free_port();
    let children = [
        dist_check_process(port, 0, 3, 1, &[]),
        dist_check_process(port, 2, 3, 1, &[]),
    ];
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("rank 1 of 3 did not arrive"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}

#[test]
fn devices_disagreeing_with_torchrun_are_refused() {
    let child = dist_check_process(free_port(), 0, 2, 20, &["--devices", "4"]);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--nproc-per-node 2") && stderr.contains("--devices is 4"),
        "{stderr}"
    );
}

/// Wait for every child, killing them all if one is still running after `limit` (a
/// hang: the watchdog did not end it); stderr and exit status of each, in order.
fn wait_all(
    mut children: Vec<std::process::Child>,
    limit: Duration,
) -> Vec<(std::process::ExitStatus, String)> {
    let start = Instant::now();
    loop {
        let running: Vec<usize> = children
            .iter_mut()
            .enumerate()
            .filter_map(|(i, c)| c.try_wait().unwrap().is_none().then_some(i))
            .collect();
        if running.is_empty() {
            break;
        }
        if start.elapsed() > limit {
            for c in &mut children {
                let _ = c.kill();
            }
            panic!("processes {running:?} still running after {limit:?}: nothing stopped them");
        }
        thread::sleep(Duration::from_millis(50));
    }
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            (out.status, String::from_utf8_lossy(&out.stderr).to_string())
        })
        .collect()
}

/// `world` dist-check processes over localhost, `extra` flags for all; rank 0 last.
fn simulated(world: usize, extra: &[&str]) -> Vec<(std::process::ExitStatus, String)> {
    simulated_with_frozen(world, extra, None)
}

/// [`simulated`], where rank `frozen` stops itself: it is killed once the others
/// have ended.
fn simulated_with_frozen(
    world: usize,
    extra: &[&str],
    frozen: Option<usize>,
) -> Vec<(std::process::ExitStatus, String)> {
    let port = free_port();
    let mut children: Vec<_> = (0..world)
        .rev()
        .map(|rank| dist_check_process(port, rank, world, 20, extra))
        .collect();
    children.reverse();
    let Some(f) = frozen else {
        return wait_all(children, Duration::from_secs(40));
    };
    let mut stopped = children.remove(f);
    let others = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_all(children, Duration::from_secs(40))
    }));
    stopped.kill().unwrap();
    let out = stopped.wait_with_output().unwrap();
    let mut results = others.unwrap_or_else(|p| std::panic::resume_unwind(p));
    results.insert(
        f,
        (out.status, String::from_utf8_lossy(&out.stderr).to_string()),
    );
    results
}

/// Every rank but `except` stopped with exactly one line, containing `want`.
fn every_other_rank_says(
    results: &[(std::process::ExitStatus, String)],
    except: Option<usize>,
    want: &str,
) {
    for (rank, (status, stderr)) in results.iter().enumerate() {
        if Some(rank) == except {
            continue;
        }
        assert!(!status.success(), "rank {rank}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "rank {rank}: {stderr}");
        assert!(stderr.contains(want), "rank {rank}: {stderr}");
    }
}

#[test]
fn a_rank_killed_after_the_rendezvous_is_named_by_every_other() {
    // The collective timeout is long: the others learn it from the closed connection.
    let long = ["--collective-timeout", "600", "--simulate", "kill"];
    let results = simulated(3, &[&long[..], &["--faulty-rank", "2"]].concat());
    assert_eq!(
        results[2].0.code(),
        None,
        "killed by a signal: {}",
        results[2].1
    );
    every_other_rank_says(
        &results,
        Some(2),
        "error: rank 2 is gone: its connection closed",
    );
    // Rank 0 itself: every other rank names it.
    let results = simulated(3, &[&long[..], &["--faulty-rank", "0"]].concat());
    every_other_rank_says(&results, Some(0), "error: rank 0 is gone");
}

#[test]
fn a_rank_that_never_reaches_the_collective_is_named_after_the_timeout() {
    for faulty in ["1", "0"] {
        let results = simulated(
            3,
            &[
                "--collective-timeout",
                "1",
                "--simulate",
                "stall",
                "--faulty-rank",
                faulty,
            ],
        );
        // Every rank, the stuck one too, stops with rank 0's verdict.
        every_other_rank_says(
            &results,
            None,
            &format!(
                "error: rank {faulty} did not reach collective #1 (all_reduce, after step 1) within 1 s"
            ),
        );
    }
}

#[test]
fn a_nan_on_one_rank_stops_every_rank_naming_it_across_processes() {
    let results = simulated(3, &["--collective-timeout", "600", "--simulate", "nan"]);
    every_other_rank_says(
        &results,
        None,
        "error: rank 1 failed: the loss is NaN (simulated by dist-check)",
    );
}

#[test]
fn a_silent_rank_is_named_after_the_silence_timeout() {
    let flags = [
        "--collective-timeout",
        "600",
        "--silence-timeout",
        "2",
        "--simulate",
        "freeze",
    ];
    let results = simulated_with_frozen(3, &flags, Some(1));
    every_other_rank_says(&results, Some(1), "error: rank 1 sent nothing for ");
}

#[test]
fn a_collective_every_rank_entered_but_none_completes_is_named() {
    let results = simulated(3, &["--collective-timeout", "1", "--simulate", "hang"]);
    every_other_rank_says(
        &results,
        None,
        "error: collective #1 (all_reduce, after step 1) did not complete within 1 s on rank",
    );
    assert!(
        results[0].1.contains("though all 3 ranks entered it"),
        "{}",
        results[0].1
    );
}

/// Issue 26: a planted extra all-reduce on one process is caught at the end of its step
/// by the out-of-band comparison through rank 0: every process stops with one line
/// naming the rank, the first collective that differs and the step.
#[test]
fn a_planted_extra_all_reduce_stops_every_process_naming_rank_collective_and_step() {
    for faulty in ["1", "2"] {
        let results = simulated(
            3,
            &[
                "--collective-timeout",
                "600",
                "--simulate",
                "desync",
                "--faulty-rank",
                faulty,
            ],
        );
        every_other_rank_says(
            &results,
            None,
            &format!(
                "error: ranks out of step: rank {faulty} and rank 0 issued different collectives: rank {faulty}'s collective #4 (after step 1) was all_reduce (sum) of 1 f32, where rank 0's was all_gather of 1 f64"
            ),
        );
    }
}

/// Issue 26: ranks out of step that hang before the step's end (NCCL waiting on calls
/// of different sizes) are named as out of step, not as a hang: rank 0 compares the
/// hashes of the ranks' last records that the heartbeats carry.
#[test]
fn ranks_out_of_step_that_hang_are_named_as_out_of_step() {
    let results = simulated(
        3,
        &[
            "--collective-timeout",
            "1",
            "--simulate",
            "desync-hang",
            "--faulty-rank",
            "2",
        ],
    );
    every_other_rank_says(
        &results,
        None,
        "error: ranks out of step: rank 2's collective #5 differs from rank 0's (all_gather, after step 1) in kind, size or dtype; then collective #",
    );
}
