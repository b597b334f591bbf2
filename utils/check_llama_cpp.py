#!/usr/bin/env python3
"""Run GGUF files written by `lit-claire quantize` in llama.cpp itself (llama-cpp-python).

    pip install llama-cpp-python safetensors numpy tokenizers
    python utils/check_llama_cpp.py [--lit-claire target/release/lit-claire] CKPT...

For each checkpoint folder (a reference or extra fixture: config.json, model.safetensors,
tokenizer.json, expected.json, ref_logits.safetensors), `lit-claire quantize --type f16`
(or `--type q8_0|q4_0`, then a looser check) writes a GGUF that llama.cpp loads with no Python converter; then:
- llama.cpp's logits on expected.json's input_ids against PyTorch's ref_logits, within
  TOLERANCE of the weight format (f16 weights agree to ~1e-3, not 1e-4);
- llama.cpp's tokenization of a text against the tokenizers library on tokenizer.json.
`--spm` also checks each llama/mistral checkpoint with tests/fixtures/spm_tokenizer (a
SentencePiece tokenizer as Llama-2 and Mistral ship it) in place of its own.
Exits non-zero on any disagreement.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from llama_cpp import Llama
from safetensors.numpy import load_file
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "data" / "sample" / "fortunes-br.txt").read_text(encoding="utf-8")[:3000]


# Largest logit error allowed, relative to the largest |logit|, per weight format. The
# fixtures' random weights are the worst case for 4-bit blocks (measured: q8_0 ~3e-2,
# q4_0 ~3e-1); check_gguf.py checks the quantized bytes themselves against llama.cpp's.
TOLERANCE = {"f16": 2e-2, "q8_0": 5e-2, "q4_0": 5e-1}


def check(ckpt: Path, binary: str, tmp: Path, label: str, ty: str) -> bool:
    gguf = tmp / f"{label}.gguf"
    r = subprocess.run([binary, "quantize", "--checkpoint-dir", str(ckpt), "--output", str(gguf), "--type", ty],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:  # a layout llama.cpp lacks, refused with a message: not a failure
        print(f"--  {label:28s} refused: {r.stderr.strip()}")
        return True
    expected = json.loads((ckpt / "expected.json").read_text())
    ids = expected["input_ids"]
    # llama.cpp's llama architecture attends globally: compare up to the window.
    window = json.loads((ckpt / "config.json").read_text()).get("sliding_window") or len(ids)
    llm = Llama(model_path=str(gguf), n_ctx=max(64, len(ids) + 8), logits_all=True, verbose=False,
                n_threads=2, n_batch=512)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    want = load_file(str(ckpt / "ref_logits.safetensors"))["logits"].reshape(got.shape)
    got, want = got[:window], want[:window]
    logit_err = float(np.abs(got - want).max() / np.abs(want).max())
    same_argmax = float((got.argmax(-1) == want.argmax(-1)).mean())
    hf = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    want_ids = hf.encode(TEXT, add_special_tokens=False).ids
    got_ids = llm.tokenize(TEXT.encode("utf-8"), add_bos=False, special=False)
    same_tokens = got_ids == want_ids
    ok = logit_err < TOLERANCE[ty] and same_tokens
    print(f"{'ok ' if ok else 'BAD'} {label:28s} {len(got)} positions: logits max err {logit_err:.2e} (relative to max |logit|), "
          f"argmax agree {same_argmax:.0%}, tokenization of {len(want_ids)} tokens "
          f"{'identical' if same_tokens else 'DIFFERS'}")
    if not same_tokens:
        k = next((i for i, (a, b) in enumerate(zip(got_ids, want_ids)) if a != b), min(len(got_ids), len(want_ids)))
        print(f"    first difference at {k}: llama.cpp {got_ids[k:k + 8]} vs tokenizers {want_ids[k:k + 8]}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--lit-claire", default=str(ROOT / "target" / "release" / "lit-claire"))
    ap.add_argument("--spm", action="store_true")
    ap.add_argument("--type", default="f16", choices=sorted(TOLERANCE))
    a = ap.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for ckpt in a.checkpoints:
            ok &= check(ckpt, a.lit_claire, tmp, ckpt.name, a.type)
            family = json.loads((ckpt / "config.json").read_text())["model_type"]
            if a.spm and family in ("llama", "mistral"):
                spm = tmp / f"{ckpt.name}-spm"
                shutil.copytree(ckpt, spm)
                for f in ("tokenizer.json", "tokenizer_config.json"):
                    shutil.copy(ROOT / "tests" / "fixtures" / "spm_tokenizer" / f, spm / f)
                ok &= check(spm, a.lit_claire, tmp, f"{ckpt.name} + SentencePiece", a.type)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
