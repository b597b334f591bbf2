#!/usr/bin/env python3
"""Check that a folder written by `lit-claire merge-lora` / `convert-to-hf` loads in
transformers and gives the loss `lit-claire perplexity` gives.

    pip install torch transformers safetensors
    python utils/check_hf_load.py OUT [OUT ...] [--text FILE] [--bin target/debug/lit-claire] [--tol 1e-4]

For each folder: AutoModelForCausalLM.from_pretrained(OUT) (float32, eager attention)
and AutoTokenizer.from_pretrained(OUT) score the text (the first 450 characters of
data/sample/fortunes-br.txt by default: one window for the reference checkpoints) as
mean next-token cross-entropy; the same file goes through
`lit-claire perplexity --checkpoint-dir OUT --format json`. Token counts must agree and
losses differ by at most --tol. Exits non-zero otherwise. Not run in CI (needs torch).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent


def hf_loss(folder: str, text: str) -> tuple[float, int, str]:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    return loss, ids.shape[1], type(model).__name__


def lit_loss(binary: str, folder: str, text_file: str) -> tuple[float, int]:
    out = subprocess.run([binary, "perplexity", "--checkpoint-dir", folder, "--input", text_file, "--format", "json"],
                         check=True, capture_output=True, text=True)
    v = json.loads(out.stdout)
    return v["loss"], v["tokens"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--text")
    ap.add_argument("--bin", default=str(ROOT / "target/debug/lit-claire"))
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    text = Path(a.text).read_text() if a.text else (ROOT / "data/sample/fortunes-br.txt").read_text()[:450]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    failed = 0
    for folder in a.folders:
        hf, n_hf, cls = hf_loss(folder, text)
        lit, n_lit = lit_loss(a.bin, folder, f.name)
        ok = n_hf == n_lit and abs(hf - lit) <= a.tol
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {folder}: {cls} loss {hf:.6f} (transformers) vs {lit:.6f} (lit-claire), "
              f"|diff| {abs(hf - lit):.2e}, tokens {n_hf}/{n_lit}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
