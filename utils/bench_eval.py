#!/usr/bin/env python3
"""Speed of `lit-claire evaluate` against lm-evaluation-harness's Hugging Face backend,
on the same model and tasks, on this machine.

Builds two tasks from data/sample/fortunes-br.txt (lit-claire's JSON Lines; the
harness gets the same as YAMLs, through utils/check_lm_eval.py):
  bench_mc    N fortunes: the first words as context, the true next 6 words among 4
              choices (the 3 others from other fortunes);
  bench_roll  N fortunes scored whole (rolling log-likelihood).
Then runs both programs alternately (ours, theirs, ours, theirs, ...), timing each
with /usr/bin/time (wall, user+sys CPU), and prints the times and whether the
numbers agree.

    utils/bench_eval.py --model tests/fixtures/real/smollm2-135m --bin target/release/lit-claire
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_lm_eval  # noqa: E402

ROOT = check_lm_eval.ROOT


def fortunes(n, seed=0):
    text = open(os.path.join(ROOT, "data/sample/fortunes-br.txt"), encoding="utf-8").read()
    docs = [" ".join(d.split()) for d in text.split("\n%\n")]
    docs = [d for d in docs if 20 <= len(d.split()) <= 120]
    random.Random(seed).shuffle(docs)
    return docs[:n]


def write_tasks(folder, n):
    docs = fortunes(n)
    with open(os.path.join(folder, "bench.jsonl"), "w") as f:
        for i, d in enumerate(docs):
            w = d.split()
            cut = max(8, len(w) // 2)
            ctx, right = " ".join(w[:cut]), " " + " ".join(w[cut:cut + 6])
            others = []
            for k in (1, 2, 3):
                o = docs[(i + 7 * k) % len(docs)].split()
                others.append(" " + " ".join(o[len(o) // 2:len(o) // 2 + 6]))
            gold = i % 4
            choices = others[:gold] + [right] + others[gold:]
            f.write(json.dumps({"task": "bench_mc", "type": "multiple_choice", "context": ctx,
                                "choices": choices, "gold": gold}, ensure_ascii=False) + "\n")
        for d in docs:
            f.write(json.dumps({"task": "bench_roll", "type": "loglikelihood_rolling", "text": d},
                               ensure_ascii=False) + "\n")


def timed(cmd, cwd=None, env=None):
    out = subprocess.run(["/usr/bin/time", "-f", "TIME %e %U %S"] + cmd, cwd=cwd, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{out.stderr[-3000:]}")
    line = [l for l in out.stderr.splitlines() if l.startswith("TIME ")][-1]
    wall, user, sys_ = map(float, line.split()[1:])
    return wall, user + sys_, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--bin", default=os.path.join(ROOT, "target/release/lit-claire"))
    p.add_argument("--docs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--python", default=sys.executable)
    a = p.parse_args()
    model = os.path.abspath(a.model)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = os.path.join(tmp, "tasks")
        work = os.path.join(tmp, "harness")
        os.makedirs(tasks)
        os.makedirs(work)
        write_tasks(tasks, a.docs)
        names = check_lm_eval.prepare(tasks, work)
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        ours_cmd = [a.bin, "evaluate", "--checkpoint-dir", model, "--tasks", tasks, "--format", "json",
                    "--batch-size", str(a.batch_size)]
        theirs_cmd = [a.python, "-m", "lm_eval", "--model", "hf", "--model_args",
                      f"pretrained={model},dtype=float32", "--include_path", work, "--tasks", ",".join(names),
                      "--device", "cpu", "--batch_size", str(a.batch_size), "--output_path",
                      os.path.join(work, "out")]
        rows = []
        for r in range(a.rounds):
            w, c, out = timed(ours_cmd)
            rows.append(("lit-claire", r, w, c))
            ours = {(m["task"], m["metric"]): m["value"] for m in map(json.loads, out.stdout.splitlines())}
            w, c, _ = timed(theirs_cmd, cwd=work, env=env)
            rows.append(("lm_eval hf", r, w, c))
        res = json.load(open(sorted(
            os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(work, "out")) for f in fs
            if f.startswith("results_"))[-1]))
        print(f"model {model}, {a.docs} documents per task, batch size {a.batch_size}")
        print(f"{'program':<12} {'round':>5} {'wall s':>8} {'cpu s':>8}")
        for name, r, w, c in rows:
            print(f"{name:<12} {r:>5} {w:>8.1f} {c:>8.1f}")
        print(f"lm_eval's total_evaluation_time_seconds (last run): {res.get('total_evaluation_time_seconds')}")
        for (task, metric), v in sorted(ours.items()):
            h = res["results"][task].get(f"{metric},none")
            print(f"{task} {metric}: lit-claire {v:.6g}  lm_eval {h:.6g}")


if __name__ == "__main__":
    main()
