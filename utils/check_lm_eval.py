#!/usr/bin/env python3
"""lm-evaluation-harness's numbers on the evaluation fixtures, for `lit-claire evaluate`.

For each model folder, runs `lm_eval --model hf` (float32, CPU, offline) with
`--log_samples` on the tasks of a folder -- lit-claire's JSON Lines tasks turned into
harness task YAMLs, and the harness YAMLs there as they are -- and writes what it
scored to one JSON file per model:

  {"lm_eval": VERSION, "max_length": L, "tasks": [...],
   "samples": [{"task", "doc_id", "index", "loglikelihood", "is_greedy", "response"}],
   "metrics": [{"task", "metric", "value", "stderr"}]}

tests/it/evaluate.rs compares lit-claire with these files (log-likelihoods within
1e-4, is_greedy, responses and acc/acc_norm/exact_match/word perplexity identical).
With --compare BIN it also runs `BIN evaluate` itself and prints the differences.

    utils/check_lm_eval.py                       # the six reference fixtures
    utils/check_lm_eval.py --models tests/fixtures/real/smollm2-135m --max-length 0 \
        --out tests/fixtures/eval/expected --compare target/release/lit-claire

Needs a Python with lm-eval 0.4 and transformers (e.g. /work/pyenv/bin/python).
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ["llama", "mistral", "falcon", "gpt2", "gpt_neox", "gpt_neo"]


def harness_yaml(name, kind, data_file, lines):
    """A harness task YAML reading one of our JSONL tasks as its data."""
    y = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
         f"    test: {json.dumps(data_file)}", "test_split: test", f"output_type: {kind}"]
    if kind == "multiple_choice":
        y += ['doc_to_text: "{{context}}"', 'doc_to_choice: "{{choices}}"',
              'doc_to_target: "{{gold}}"', 'target_delimiter: ""']
    elif kind == "loglikelihood":
        y += ['doc_to_text: "{{context}}"', 'doc_to_target: "{{continuation}}"']
    elif kind == "loglikelihood_rolling":
        y += ['doc_to_text: ""', 'doc_to_target: "{{text}}"']
    elif kind == "generate_until":
        first = lines[0]
        until = first.get("until", ["\n\n"])
        y += ['doc_to_text: "{{context}}"', 'doc_to_target: "{{target}}"',
              "generation_kwargs:", f"  until: {json.dumps(until)}",
              f"  max_gen_toks: {first.get('max_gen_toks', 256)}", "  do_sample: false"]
        for l in lines:
            assert l.get("until", ["\n\n"]) == until and l.get("max_gen_toks") == first.get("max_gen_toks"), \
                "a converted generation task needs the same until and max_gen_toks on every line"
    return "\n".join(y) + "\n"


def prepare(tasks_dir, work):
    """Harness YAMLs for every task of `tasks_dir` in `work`; returns the task names."""
    names = []
    for path in sorted(glob.glob(os.path.join(tasks_dir, "*.yaml"))):
        dst = os.path.join(work, os.path.basename(path))
        shutil.copy(path, dst)
        text = open(path).read()
        names.append(next(l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("task:")))
        # Data files named in the YAML are relative to its folder: copy them beside.
        for f in os.listdir(tasks_dir):
            if f.endswith((".csv",)) or (f.endswith(".jsonl") and f in text):
                shutil.copy(os.path.join(tasks_dir, f), work)
    for path in sorted(glob.glob(os.path.join(tasks_dir, "*.jsonl"))):
        rows = [json.loads(l) for l in open(path) if l.strip()]
        if not rows or "task" not in rows[0] or "type" not in rows[0]:
            continue
        by_task = {}
        for r in rows:
            by_task.setdefault(r["task"], []).append(r)
        for name, lines in by_task.items():
            data = os.path.join(work, f"{name}.data.jsonl")
            with open(data, "w") as f:
                for l in lines:
                    f.write(json.dumps(l, ensure_ascii=False) + "\n")
            with open(os.path.join(work, f"{name}.yaml"), "w") as f:
                f.write(harness_yaml(name, lines[0]["type"], data, lines))
            names.append(name)
    return names


def run_lm_eval(model, names, work, max_length, python):
    out = os.path.join(work, "out")
    args = f"pretrained={model},dtype=float32" + (f",max_length={max_length}" if max_length else "")
    cmd = [python, "-m", "lm_eval", "--model", "hf", "--model_args", args, "--include_path", work,
           "--tasks", ",".join(names), "--device", "cpu", "--batch_size", "1", "--log_samples",
           "--output_path", out]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"lm_eval failed:\n{done.stderr[-4000:]}")
    results = json.load(open(glob.glob(os.path.join(out, "*", "results_*.json"))[0]))
    samples = []
    for name in names:
        kind = results["configs"][name]["output_type"]
        for line in open(glob.glob(os.path.join(out, "*", f"samples_{name}_*.jsonl"))[0]):
            s = json.loads(line)
            for i, resp in enumerate(s["resps"]):
                r = resp[0]
                row = {"task": name, "doc_id": s["doc_id"], "index": i}
                if kind == "generate_until":
                    row["response"] = r
                elif kind == "loglikelihood_rolling":
                    row["loglikelihood"] = float(r)
                else:
                    row["loglikelihood"] = float(r[0])
                    row["is_greedy"] = r[1] == "True" or r[1] is True
                samples.append(row)
    metrics = []
    for name in names:
        for key, value in results["results"][name].items():
            if "," not in key or "_stderr" in key:
                continue
            metric, flt = key.split(",")
            se = results["results"][name].get(f"{metric}_stderr,{flt}")
            metrics.append({"task": name, "metric": metric, "value": value,
                            "stderr": se if isinstance(se, (int, float)) else None})
    return results, samples, metrics


def compare(binary, model, tasks_dir, expected, max_length):
    """Run lit-claire on the same tasks and print the largest differences."""
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "samples.jsonl")
        cmd = [binary, "evaluate", "--checkpoint-dir", model, "--tasks", tasks_dir, "--format", "json",
               "--log-samples", log] + (["--max-length", str(max_length)] if max_length else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        ours = {(r["task"], r["doc_id"], r["index"]): r for r in map(json.loads, open(log))}
        ours_m = {(m["task"], m["metric"]): m for m in map(json.loads, out.splitlines())}
    worst, bad = 0.0, []
    for s in expected["samples"]:
        o = ours[(s["task"], s["doc_id"], s["index"])]
        if "loglikelihood" in s:
            worst = max(worst, abs(o["loglikelihood"] - s["loglikelihood"]))
        if "is_greedy" in s and o.get("is_greedy") != s["is_greedy"]:
            bad.append(f"is_greedy {s}")
        if "response" in s and o.get("response") != s["response"]:
            bad.append(f"response {s['response']!r} vs {o.get('response')!r}")
    for m in expected["metrics"]:
        o = ours_m[(m["task"], m["metric"])]
        if abs(o["value"] - m["value"]) > 1e-9 * max(1.0, abs(m["value"])):
            bad.append(f"{m['task']} {m['metric']}: harness {m['value']} ours {o['value']}")
    print(f"  max |Δ loglikelihood| = {worst:.2e} over {len(expected['samples'])} requests; "
          f"{len(bad)} other difference(s)")
    for b in bad:
        print("   ", b)
    return worst <= 1e-4 and not bad


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=[os.path.join(ROOT, "tests/fixtures/reference", f) for f in FAMILIES])
    p.add_argument("--tasks", default=os.path.join(ROOT, "tests/fixtures/eval/tasks"))
    p.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/eval/expected"))
    p.add_argument("--max-length", type=int, default=32,
                   help="context window (0: the model's); small, so that rolling windows and truncation happen")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--compare", metavar="BIN", help="also run BIN evaluate and compare")
    a = p.parse_args()
    ok = True
    for model in a.models:
        model = os.path.abspath(model)
        name = os.path.basename(model.rstrip("/"))
        with tempfile.TemporaryDirectory() as work:
            names = prepare(os.path.abspath(a.tasks), work)
            results, samples, metrics = run_lm_eval(model, names, work, a.max_length, a.python)
        expected = {"lm_eval": results.get("lm_eval_version"), "transformers": results.get("transformers_version"),
                    "max_length": a.max_length, "tasks": names, "samples": samples, "metrics": metrics}
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"{name}.json"), "w") as f:
            json.dump(expected, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"{name}: {len(samples)} requests, {len(metrics)} metrics")
        if a.compare:
            ok &= compare(a.compare, model, a.tasks, expected, a.max_length)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
