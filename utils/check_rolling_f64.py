#!/usr/bin/env python3
"""Rolling log-likelihoods of the real-model evaluation fixture, exactly (float64).

    lit-claire evaluate --checkpoint-dir tests/fixtures/real/smollm2-135m \
        --tasks tests/fixtures/eval/tasks/mixed.jsonl tests/fixtures/eval/tasks/csv_roll.yaml \
        --log-samples /tmp/ours.jsonl
    python3 utils/check_rolling_f64.py /tmp/ours.jsonl

For each document scored whole (`pt_roll`, `pt_csv_roll`: each fits one window of the
model's 8192 tokens, so the harness scores the document's tokens after its prefix token,
BOS), prints lm-evaluation-harness's value (tests/fixtures/eval/expected/smollm2-135m.json,
`lm_eval --model hf` in float32), transformers' in float32 and float64, and ours, with
the distances to the float64 value. It tells whose float32 error a difference is.
"""
import csv
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests/fixtures/real/smollm2-135m"
TASKS = ROOT / "tests/fixtures/eval/tasks"


def documents():
    rows = [json.loads(line) for line in open(TASKS / "mixed.jsonl")]
    docs = [("pt_roll", i, r["text"]) for i, r in enumerate(r for r in rows if r["task"] == "pt_roll")]
    with open(TASKS / "csv_roll.csv", newline="") as f:
        docs += [("pt_csv_roll", i, r["texto"]) for i, r in enumerate(csv.DictReader(f))]
    return docs


def main(ours_path):
    samples = json.load(open(ROOT / "tests/fixtures/eval/expected/smollm2-135m.json"))["samples"]
    harness = {(s["task"], s["doc_id"]): s["loglikelihood"] for s in samples if "loglikelihood" in s}
    ours = {}
    for line in open(ours_path):
        s = json.loads(line)
        if "loglikelihood" in s:
            ours[(s["task"], s["doc_id"])] = s["loglikelihood"]
    tok = AutoTokenizer.from_pretrained(MODEL)
    models = [AutoModelForCausalLM.from_pretrained(MODEL, dtype=d).eval() for d in (torch.float32, torch.float64)]
    worst = {"harness": 0.0, "ours": 0.0}
    for task, i, text in documents():
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        sums = []
        for m in models:
            with torch.no_grad():
                lp = torch.log_softmax(m(x).logits.double(), -1)[0, :-1]
            sums.append(lp.gather(1, x[0, 1:, None]).sum().item())
        h, o, exact = harness[(task, i)], ours[(task, i)], sums[1]
        worst["harness"] = max(worst["harness"], abs(h - exact))
        worst["ours"] = max(worst["ours"], abs(o - exact))
        print(f"{task} {i} ({len(ids) - 1} tokens): harness {h:.5f}, transformers f32 {sums[0]:.5f}, "
              f"f64 {exact:.5f}, ours {o:.5f}; from f64: harness {h - exact:+.1e}, ours {o - exact:+.1e}")
    print(f"largest distance to float64: harness {worst['harness']:.1e}, ours {worst['ours']:.1e}")


if __name__ == "__main__":
    main(sys.argv[1])
