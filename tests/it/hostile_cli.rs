//! Issue 23, second round of hostile inputs: the bench flags, the process group and
//! rendezvous, plot's axes, `validate --watch`, the memory plan and `quantize`'s
//! output. Each case, and the neighbours of its class, gives a one-line error naming
//! the flag, variable or field at fault with a non-zero exit, and writes nothing; or
//! the right answer, in bounded time.

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use lit_claire::strategy::rendezvous::Rendezvous;

use crate::common::{bin, reference_dir, temp_dir};

/// The binary with `args` and `env`, killed after `limit`.
fn run_with(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    // No launcher of the test's own environment leaks in.
    for var in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_STEP_ID",
        "SLURM_NNODES",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{args:?} still running after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// It must fail with one line on stderr (no panic) that contains every `want`.
fn fails_with(args: &[&str], env: &[(&str, &str)], want: &[&str]) -> String {
    let out = run_with(args, env, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success(), "{args:?} succeeded: {err}");
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{args:?} panicked: {err}"
    );
    assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
    for w in want {
        assert!(err.contains(w), "{args:?}: {err:?} does not say {w:?}");
    }
    err
}

/// A tiny bench with `over` replacing its flags.
fn bench_args<'a>(over: &[&'a str]) -> Vec<&'a str> {
    let mut flags: Vec<(&str, &str)> = vec![
        ("--layers", "1"),
        ("--width", "64"),
        ("--heads", "2"),
        ("--vocab", "64"),
        ("--seq", "8"),
        ("--batch", "1"),
        ("--warmup", "0"),
        ("--steps", "1"),
        ("--peak-gflops", "1"),
        ("--mode", "both"),
    ];
    for pair in over.chunks(2) {
        match flags.iter_mut().find(|f| f.0 == pair[0]) {
            Some(f) => f.1 = pair[1],
            None => flags.push((pair[0], pair[1])),
        }
    }
    let mut args = vec!["bench"];
    for (k, v) in flags {
        args.extend([k, v]);
    }
    args
}

/// Cases 2 and 3: `bench --seq 0` and `--batch 0` panicked. Every count flag, the
/// shapes the model cannot take and sizes no machine holds are one line naming the
/// flag, before any allocation.
#[test]
fn issue23_bench_flags_are_checked() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["--seq", "0"], &["--seq must be at least 1"]),
        (&["--batch", "0"], &["--batch must be at least 1"]),
        (&["--layers", "0"], &["--layers must be at least 1"]),
        (&["--width", "0"], &["--width"]),
        (&["--heads", "0"], &["--heads must be at least 1"]),
        (&["--kv-heads", "0"], &["--kv-heads must be at least 1"]),
        (&["--vocab", "0"], &["--vocab must be at least 1"]),
        (
            &["--intermediate", "0"],
            &["--intermediate must be at least 1"],
        ),
        (&["--width", "2"], &["--intermediate", "--width 2"]),
        (&["--steps", "0"], &["--steps must be at least 1"]),
        (&["--peak-gflops", "0"], &["--peak-gflops 0"]),
        (&["--peak-gflops", "NaN"], &["--peak-gflops NaN"]),
        (&["--peak-gflops", "inf"], &["--peak-gflops inf"]),
        (
            &["--width", "63"],
            &["--width 63 is not a multiple of --heads 2"],
        ),
        (
            &["--width", "66", "--heads", "6"],
            &["head size of 11", "even"],
        ),
        (
            &["--kv-heads", "3"],
            &["--kv-heads 3 must divide --heads 2"],
        ),
        (&["--layers", "5000"], &["--layers 5000"]),
        (&["--vocab", "5000000000"], &["--vocab 5000000000"]),
        (&["--lora-r", "0"], &["--lora-r"]),
        (
            &["--width", "1000000000000"],
            &[
                "--width",
                "hidden_size 1000000000000",
                "more than any machine",
            ],
        ),
        (
            &["--seq", "100000000000000"],
            &["needs about", "lower --batch, --seq"],
        ),
        (
            &["--batch", "10000000000000000"],
            &["past 2^64 bytes", "--batch 10000000000000000"],
        ),
    ];
    for (over, want) in cases {
        let start = Instant::now();
        fails_with(&bench_args(over), &[], want);
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{over:?}: {:?}",
            start.elapsed()
        );
    }
    // The same shapes' neighbours in attention-check.
    let cases: &[(&[&str], &[&str])] = &[
        (&["--seq", "0"], &["--seq must be at least 1"]),
        (&["--batch", "0"], &["--batch must be at least 1"]),
        (&["--head-size", "0"], &["--head-size must be at least 1"]),
        (&["--heads", "0"], &["--heads must be at least 1"]),
        (&["--kv-heads", "0"], &["--kv-heads must be at least 1"]),
        (
            &["--kv-heads", "3"],
            &["--kv-heads 3 must divide --heads 32"],
        ),
        (&["--steps", "0"], &["--steps must be at least 1"]),
        (&["--seq", "100000000"], &["needs about", "--seq"]),
        (
            &["--batch", "100000000000", "--seq", "100000000000"],
            &["more than 2^64 bytes"],
        ),
    ];
    for (over, want) in cases {
        let mut args = vec!["attention-check"];
        args.extend_from_slice(over);
        fails_with(&args, &[], want);
    }
}

#[test]
fn issue23_a_small_bench_still_runs() {
    let out = run_with(&bench_args(&[]), &[], Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("train-full") && stdout.contains("train-lora"),
        "{stdout}"
    );
}

/// Case 5: `WORLD_SIZE=1000000000` built the list of missing ranks as one array and
/// ran out of memory. A world past the limit is refused naming the variable; the
/// largest allowed one times out naming its missing ranks as one range.
#[test]
fn issue23_huge_worlds_are_refused_or_summarised() {
    let start = Instant::now();
    fails_with(
        &["dist-check", "--timeout", "1"],
        &[("RANK", "0"), ("WORLD_SIZE", "1000000000")],
        &["WORLD_SIZE is 1000000000", "at most 65536"],
    );
    fails_with(
        &["dist-check", "--timeout", "1"],
        &[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "4294967296"),
            ("SLURM_JOB_NODELIST", "localhost"),
            ("SLURM_STEP_ID", "0"),
        ],
        &["SLURM_NTASKS is 4294967296"],
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    fails_with(
        &["dist-check", "--timeout", "1"],
        &[
            ("RANK", "0"),
            ("WORLD_SIZE", "65536"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &port),
        ],
        &["ranks 1-65535 of 65536 did not arrive"],
    );
    // The other counts of dist-check: seconds a Duration holds, sizes a GPU holds.
    for (flag, value) in [
        ("--timeout", "inf"),
        ("--timeout", "1e300"),
        ("--timeout", "0"),
        ("--timeout", "NaN"),
        ("--collective-timeout", "inf"),
        ("--silence-timeout", "-1"),
    ] {
        let arg = format!("{flag}={value}");
        fails_with(
            &["dist-check", &arg],
            &[],
            &[flag, "expected a positive number of seconds"],
        );
    }
    fails_with(
        &["dist-check", "--bench-mib", "100000000000"],
        &[],
        &["--bench-mib 100000000000"],
    );
}

/// Case 23: `SLURM_NNODES=0` was blamed on `--num-nodes 0`, never passed.
#[test]
fn issue23_slurm_counts_name_their_variable() {
    let slurm = |extra: &[(&'static str, &'static str)]| {
        let mut env = vec![
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_NODELIST", "localhost"),
            ("SLURM_STEP_ID", "0"),
        ];
        env.extend_from_slice(extra);
        env
    };
    for (extra, want) in [
        (vec![("SLURM_NNODES", "0")], "SLURM_NNODES=0"),
        (vec![("SLURM_JOB_NUM_NODES", "0")], "SLURM_JOB_NUM_NODES=0"),
        (
            vec![("SLURM_NTASKS_PER_NODE", "0")],
            "SLURM_NTASKS_PER_NODE is 0",
        ),
        // 2 tasks over 3 nodes: 1 per node, 3 ≠ 2, said with the variables.
        (vec![("SLURM_NNODES", "3")], "3 nodes (SLURM_NNODES)"),
    ] {
        let err = fails_with(&["dist-check", "--timeout", "1"], &slurm(&extra), &[want]);
        assert!(
            !err.contains("--num-nodes 0") && !err.contains("--num-nodes 3"),
            "{err}"
        );
    }
}

/// Case 22: rank 0 greeted connections one at a time, 10 s each: one idle connection
/// made a 6 s rendezvous report a rank that had connected as missing. A planted idle
/// connection (and one that sends garbage) no longer holds anyone up.
#[test]
fn issue23_an_idle_connection_does_not_block_the_rendezvous() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rdv = |rank: usize| Rendezvous {
        addr: "127.0.0.1".into(),
        port,
        port_source: "MASTER_PORT".into(),
        rank,
        world_size: 3,
        timeout: Duration::from_secs(6),
        secret: lit_claire::strategy::env::JobSecret::none(),
    };
    let payload = b"the shared id".to_vec();
    let zero = {
        let rdv = rdv(0);
        let payload = payload.clone();
        thread::spawn(move || rdv.share(Some(&payload)).map_err(|e| e.to_string()))
    };
    // Strangers first: one silent, one that sends a few bytes and stalls, one garbage.
    let connect = || loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    };
    let idle = connect();
    let mut partial = connect();
    partial.write_all(b"LC").unwrap();
    let mut garbage = connect();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let others: Vec<_> = [1, 2]
        .into_iter()
        .map(|r| {
            let rdv = rdv(r);
            thread::spawn(move || rdv.share(None).map_err(|e| e.to_string()))
        })
        .collect();
    for o in others {
        assert_eq!(o.join().unwrap().unwrap(), payload);
    }
    assert_eq!(zero.join().unwrap().unwrap(), payload);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the strangers held the rendezvous up: {:?}",
        start.elapsed()
    );
    drop((idle, partial, garbage));
}

/// Case 10: a loss of 1e300 padded the log axis to infinity and the tick loop spun
/// forever. Every extreme finite loss draws in bounded time; non-finite ones are
/// left off.
#[test]
fn issue23_plot_of_extreme_losses_ends() {
    let tmp = temp_dir();
    for (i, extreme) in [
        "1e300",
        "1.7976931348623157e308",
        "1e-300",
        "inf",
        "nan",
        "-1e300",
    ]
    .iter()
    .enumerate()
    {
        let run = tmp.path().join(format!("run{i}"));
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(
            run.join("metrics.csv"),
            format!("step,tokens,loss\n1,4096,2.5\n2,8192,{extreme}\n3,18446744073709551615,2.0\n"),
        )
        .unwrap();
        for (x, ext) in [("step", "png"), ("tokens", "svg")] {
            let out = tmp.path().join(format!("run{i}-{x}.{ext}"));
            let output = run_with(
                &[
                    "plot",
                    run.to_str().unwrap(),
                    "--x",
                    x,
                    "--output",
                    out.to_str().unwrap(),
                ],
                &[],
                Duration::from_secs(60),
            );
            assert!(
                output.status.success(),
                "{extreme} --x {x}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(out.is_file(), "{extreme}");
        }
    }
}

/// Case 11: `validate --watch 0` on a run without final/ spun one core forever.
#[test]
fn issue23_validate_refuses_watch_0() {
    let tmp = temp_dir();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let start = Instant::now();
    fails_with(
        &[
            "validate",
            "--out-dir",
            run.to_str().unwrap(),
            "--data-dir",
            tmp.path().join("data").to_str().unwrap(),
            "--watch",
            "0",
        ],
        &[],
        &["--watch 0", "at least 1 s"],
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(std::fs::read_dir(&run).unwrap().count(), 0);
}

/// A checkpoint folder holding only `config.json`: what `--dry-run` reads.
fn config_only(root: &Path, name: &str, config: serde_json::Value) -> std::path::PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

fn llama(hidden: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"model_type": "llama", "hidden_size": hidden,
        "num_attention_heads": 32, "num_hidden_layers": 32,
        "intermediate_size": 11008, "vocab_size": 32000})
}

/// `pretrain --dry-run`'s table as `label → first column`.
fn plan_row(out: &str, label: &str) -> String {
    out.lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label} in {out}"))[label.len()..]
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Case 17: `hidden_size: 1e9` wrapped the plan ("optimizer state" less than the
/// parameters), 2^62 printed "parameters 0.0 MiB". Such shapes are refused naming the
/// field; a large legal one is planned exactly.
#[test]
fn issue23_dry_run_of_huge_shapes() {
    let tmp = temp_dir();
    for hidden in [
        serde_json::json!(1_000_000_000u64),
        serde_json::json!(1u64 << 62),
        serde_json::json!(u64::MAX),
    ] {
        let dir = config_only(tmp.path(), "huge", llama(hidden.clone()));
        fails_with(
            &[
                "pretrain",
                "--dry-run",
                "--checkpoint-dir",
                dir.to_str().unwrap(),
            ],
            &[],
            &[
                "config.json",
                &format!("hidden_size {hidden}"),
                "more than any machine holds",
            ],
        );
    }
    // A context no machine holds: the plan is refused, naming where the length came from.
    let mut long = llama(serde_json::json!(4096));
    long["max_position_embeddings"] = serde_json::json!(1_000_000_000_000u64);
    let dir = config_only(tmp.path(), "long", long);
    fails_with(
        &[
            "pretrain",
            "--dry-run",
            "--checkpoint-dir",
            dir.to_str().unwrap(),
            "--micro-batch-size",
            "1000000",
            "--batch-size",
            "1000000",
        ],
        &[],
        &[
            "past 2^64 bytes",
            "--micro-batch-size",
            "max_position_embeddings",
        ],
    );
    // 7B in f32: parameters 25.10 GiB, optimizer state twice that, exactly.
    let dir = config_only(tmp.path(), "7b", llama(serde_json::json!(4096)));
    let out = run_with(
        &[
            "pretrain",
            "--dry-run",
            "--checkpoint-dir",
            dir.to_str().unwrap(),
        ],
        &[],
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(plan_row(&text, "parameters"), "25.10 GiB", "{text}");
    assert_eq!(plan_row(&text, "optimizer state"), "50.21 GiB", "{text}");
}

/// Case 25 (ranks): `--device cpu --devices 2000` took 9 GB in 4 s while the plan
/// assumed one rank. Thread ranks past 4 per core are refused before anything loads;
/// the plan of a few counts each rank's copy.
#[test]
fn issue23_cpu_ranks_are_bounded_and_planned() {
    let tmp = temp_dir();
    let dir = config_only(tmp.path(), "7b", llama(serde_json::json!(4096)));
    let ckpt = dir.to_str().unwrap();
    fails_with(
        &[
            "pretrain",
            "--dry-run",
            "--checkpoint-dir",
            ckpt,
            "--devices",
            "2000",
        ],
        &[],
        &[
            "--devices 2000",
            "threads of this one process",
            "4 per core",
        ],
    );
    let out_dir = tmp.path().join("out");
    let start = Instant::now();
    fails_with(
        &[
            "pretrain",
            "--checkpoint-dir",
            ckpt,
            "--data-dir",
            tmp.path().join("data").to_str().unwrap(),
            "--out-dir",
            out_dir.to_str().unwrap(),
            "--device",
            "cpu",
            "--devices",
            "2000",
        ],
        &[],
        &["--devices 2000"],
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(!out_dir.exists(), "a refused run left its folder");
    // More ranks than a run can have, on GPUs too, and no overflow of their product.
    for (devices, nodes) in [("100000", "1"), ("4611686018427387904", "4")] {
        fails_with(
            &[
                "pretrain",
                "--dry-run",
                "--checkpoint-dir",
                ckpt,
                "--device",
                "cuda",
                "--devices",
                devices,
                "--num-nodes",
                nodes,
            ],
            &[],
            &["more ranks than a run can have"],
        );
    }
    // Two thread ranks: each rank's parts, and a total that counts both.
    let plan = |devices: &str| {
        let out = run_with(
            &[
                "pretrain",
                "--dry-run",
                "--checkpoint-dir",
                ckpt,
                "--devices",
                devices,
            ],
            &[],
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let (one, two) = (plan("1"), plan("2"));
    assert_eq!(plan_row(&one, "parameters"), plan_row(&two, "parameters"));
    assert!(
        two.contains("ranks (threads)") && two.contains("× 2"),
        "{two}"
    );
    assert!(!one.contains("ranks (threads)"), "{one}");
    let gib =
        |t: &str, row: &str| -> f64 { plan_row(t, row).trim_end_matches(" GiB").parse().unwrap() };
    // Each of the 2 ranks also holds two blocks' gradient sums in flight (ddp sums
    // each block's as its backward ends), which one rank does not: 2 × 4 bytes × a
    // block of 202 million parameters.
    let in_flight = gib(&two, "gradients") - gib(&one, "gradients");
    assert!((in_flight - 1.51).abs() < 0.01, "{one}\n{two}");
    assert!(
        (gib(&two, "total") - 2.0 * (gib(&one, "total") + in_flight)).abs() < 0.03,
        "{one}\n{two}"
    );
}

/// Case 18: `quantize --output M/model.safetensors --overwrite` replaced the weights it
/// was reading. An input of the checkpoint is refused even with --overwrite, by path,
/// through a symlinked folder and through a symlinked file; other outputs still work.
#[cfg(unix)]
#[test]
fn issue23_quantize_never_replaces_its_input() {
    let tmp = temp_dir();
    let m = tmp.path().join("M");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(reference_dir("llama")).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, m.join(p.file_name().unwrap())).unwrap();
        }
    }
    let weights = std::fs::read(m.join("model.safetensors")).unwrap();
    let alias = tmp.path().join("alias");
    std::os::unix::fs::symlink(&m, &alias).unwrap();
    let link = tmp.path().join("weights.gguf");
    std::os::unix::fs::symlink(m.join("model.safetensors"), &link).unwrap();
    let quantize = |out: &Path, overwrite: bool| {
        let mut args = vec![
            "quantize",
            "--checkpoint-dir",
            m.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ];
        if overwrite {
            args.push("--overwrite");
        }
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    for out in [
        m.join("model.safetensors"),
        alias.join("model.safetensors"),
        m.join("config.json"),
        alias.join("tokenizer.json"),
        link.clone(),
    ] {
        for overwrite in [true, false] {
            let args = quantize(&out, overwrite);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            fails_with(&args, &[], &["--output", "quantize reads", "elsewhere"]);
        }
    }
    assert_eq!(std::fs::read(m.join("model.safetensors")).unwrap(), weights);
    let leftovers: Vec<_> = std::fs::read_dir(&m)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') || n.ends_with(".gguf"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A new file in the folder, and replacing it, are fine.
    for overwrite in [false, true] {
        let args = quantize(&m.join("model.gguf"), overwrite);
        let out = run_with(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            &[],
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(std::fs::read(m.join("model.safetensors")).unwrap(), weights);
}
