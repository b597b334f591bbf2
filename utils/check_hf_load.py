#!/usr/bin/env python3
"""Check that a folder written by `lit-claire merge-lora` / `convert-to-hf` loads in
transformers, and that a LoRA adapter written by `lit-claire pretrain` loads in PEFT,
each giving the loss `lit-claire perplexity` gives.

    pip install torch transformers peft safetensors
    python utils/check_hf_load.py OUT [OUT ...] [--text FILE] [--bin target/debug/lit-claire] [--tol 1e-4]
    python utils/check_hf_load.py RUN/final ...          # an adapter: base + PEFT

For each folder: AutoModelForCausalLM.from_pretrained(OUT) (float32, eager attention)
and AutoTokenizer.from_pretrained(OUT) score the text (the first 450 characters of
data/sample/fortunes-br.txt by default: one window for the reference checkpoints) as
mean next-token cross-entropy; the same file goes through
`lit-claire perplexity --checkpoint-dir OUT --format json`. A folder holding
`adapter_config.json` is an adapter: its base (`base_model_name_or_path`) is loaded the
same way, the adapter on it with `PeftModel.from_pretrained`, and lit-claire scores it
with `perplexity --checkpoint-dir BASE --adapter OUT`. Token counts must agree and
losses differ by at most --tol. Exits non-zero otherwise. Not run in CI (needs torch).

`--write-fixture FILE` also writes the text and, for each adapter, keyed by its base
folder's name, PEFT's loss and the base's (`peft_loss`, `base_loss`, `tokens`). That is
how tests/fixtures/extra/lora_fused_peft.json was made, from the runs that
`cargo test --test it lora_fused` leaves in `target/tmp/lora_fused/*/run/final`, on a
text that fits every fixture's context in one window (GPT-2 scores no more than
`n_positions` tokens; lit-claire would cut windows):

    head -c 100 data/sample/fortunes-br.txt > /tmp/t.txt
    python utils/check_hf_load.py target/tmp/lora_fused/*/run/final --text /tmp/t.txt \
        --write-fixture tests/fixtures/extra/lora_fused_peft.json
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


def score(model, tok, text: str) -> tuple[float, int]:
    model.eval()
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    return loss, ids.shape[1]


def load(folder: str):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model, tok


def lit_loss(binary: str, folder: str, text_file: str, adapter: str | None = None) -> tuple[float, int]:
    cmd = [binary, "perplexity", "--checkpoint-dir", folder, "--input", text_file, "--format", "json"]
    if adapter:
        cmd += ["--adapter", adapter]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    v = json.loads(out.stdout)
    return v["loss"], v["tokens"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--text")
    ap.add_argument("--bin", default=str(ROOT / "target/debug/lit-claire"))
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--write-fixture")
    a = ap.parse_args()
    text = Path(a.text).read_text() if a.text else (ROOT / "data/sample/fortunes-br.txt").read_text()[:450]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    failed = 0
    fixture = {}
    for folder in a.folders:
        adapter_cfg = Path(folder) / "adapter_config.json"
        if adapter_cfg.exists():
            from peft import PeftModel

            base = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
            model, tok = load(base)
            base_loss, _ = score(model, tok, text)
            model = PeftModel.from_pretrained(model, folder)
            hf, n_hf = score(model, tok, text)
            lit, n_lit = lit_loss(a.bin, base, f.name, adapter=folder)
            cls = f"PEFT {type(model.base_model.model).__name__} + adapter"
            fixture[Path(base).name] = {"peft_loss": hf, "base_loss": base_loss, "tokens": n_hf}
        else:
            model, tok = load(folder)
            hf, n_hf = score(model, tok, text)
            lit, n_lit = lit_loss(a.bin, folder, f.name)
            cls = type(model).__name__
        ok = n_hf == n_lit and abs(hf - lit) <= a.tol
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {folder}: {cls} loss {hf:.6f} (transformers) vs {lit:.6f} (lit-claire), "
              f"|diff| {abs(hf - lit):.2e}, tokens {n_hf}/{n_lit}")
    if a.write_fixture:
        if failed:
            print("not writing the fixture: some checks failed")
        else:
            doc = {"text": text, "adapters": fixture}
            Path(a.write_fixture).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            print(f"wrote {a.write_fixture}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
