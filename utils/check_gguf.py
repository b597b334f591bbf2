#!/usr/bin/env python3
"""Check a GGUF file written by `lit-claire quantize` with llama.cpp's own Python package.

    pip install gguf safetensors numpy torch
    lit-claire quantize --checkpoint-dir CKPT --output model.gguf --type q8_0
    python utils/check_gguf.py CKPT model.gguf

The file is read with `gguf.GGUFReader`; every tensor is recomputed from the Hugging Face
weights the way llama.cpp's convert_hf_to_gguf.py does it (LLaMA q/k row permutation,
Falcon qkv regrouping), encoded with `gguf.quants.quantize` (llama.cpp's reference
quantizers) and compared byte for byte. Exits non-zero on any difference.
"""
import json
import sys
from pathlib import Path

import gguf
import numpy as np
from safetensors.torch import load_file


def hf_tensors(ckpt: Path) -> dict:
    index = ckpt / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        out.update({k: v.float().numpy() for k, v in load_file(ckpt / f).items()})
    return out


def permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected(ckpt: Path, arch: str, cfg: dict) -> dict:
    t = hf_tensors(ckpt)
    want = {}
    if arch == "llama":
        n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        want["token_embd.weight"] = t["model.embed_tokens.weight"]
        want["output_norm.weight"] = t["model.norm.weight"]
        if "lm_head.weight" in t and not cfg.get("tie_word_embeddings", False):
            want["output.weight"] = t["lm_head.weight"]
        for i in range(cfg["num_hidden_layers"]):
            p, b = f"model.layers.{i}.", f"blk.{i}."
            want[b + "attn_q.weight"] = permute(t[p + "self_attn.q_proj.weight"], n_head)
            want[b + "attn_k.weight"] = permute(t[p + "self_attn.k_proj.weight"], n_kv)
            for hf_name, g in [("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"),
                               ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                               ("post_attention_layernorm", "ffn_norm")]:
                want[b + g + ".weight"] = t[p + hf_name + ".weight"]
    else:  # falcon
        n_head = cfg["num_attention_heads"]
        multi_query = cfg.get("multi_query", True) and not cfg.get("new_decoder_architecture", False)
        n_kv = 1 if multi_query else (cfg.get("num_kv_heads") or n_head)
        hd = cfg["hidden_size"] // n_head
        want["token_embd.weight"] = t["transformer.word_embeddings.weight"]
        want["output_norm.weight"] = t["transformer.ln_f.weight"]
        want["output_norm.bias"] = t["transformer.ln_f.bias"]
        if "lm_head.weight" in t and not cfg.get("tie_word_embeddings", True):
            want["output.weight"] = t["lm_head.weight"]
        for i in range(cfg["num_hidden_layers"]):
            p, b = f"transformer.h.{i}.", f"blk.{i}."
            w = t[p + "self_attention.query_key_value.weight"]
            qkv = w.reshape(n_kv, n_head // n_kv + 2, hd, w.shape[1])  # convert_hf_to_gguf.py FalconModel
            q = qkv[:, :-2].reshape(n_head * hd, w.shape[1])
            k = qkv[:, [-2]].reshape(n_kv * hd, w.shape[1])
            v = qkv[:, [-1]].reshape(n_kv * hd, w.shape[1])
            want[b + "attn_qkv.weight"] = np.concatenate([q, k, v])
            want[b + "attn_output.weight"] = t[p + "self_attention.dense.weight"]
            want[b + "ffn_up.weight"] = t[p + "mlp.dense_h_to_4h.weight"]
            want[b + "ffn_down.weight"] = t[p + "mlp.dense_4h_to_h.weight"]
            norm = "input_layernorm" if p + "input_layernorm.weight" in t else "ln_attn"
            want[b + "attn_norm.weight"] = t[p + norm + ".weight"]
            want[b + "attn_norm.bias"] = t[p + norm + ".bias"]
            if p + "ln_mlp.weight" in t:
                want[b + "attn_norm_2.weight"] = t[p + "ln_mlp.weight"]
                want[b + "attn_norm_2.bias"] = t[p + "ln_mlp.bias"]
    return want


def main() -> int:
    ckpt, path = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = json.loads((ckpt / "config.json").read_text())
    r = gguf.GGUFReader(path)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    want = expected(ckpt, arch, cfg)
    got = {t.name: t for t in r.tensors}
    bad = sorted(set(want) ^ set(got))
    if bad:
        print(f"tensor names differ: {bad}")
        return 1
    worst = 0
    for name, w in want.items():
        t = got[name]
        exact = gguf.quants.quantize(w, t.tensor_type) if w.ndim > 1 else w.astype(np.float32)
        if np.asarray(t.data).tobytes() != np.asarray(exact).tobytes():
            print(f"{name}: bytes differ from gguf.quants.quantize ({t.tensor_type.name})")
            return 1
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        worst = max(worst, float(np.abs(deq - w).max()))
    kinds = sorted({t.tensor_type.name for t in r.tensors})
    print(f"{path}: {arch}, {len(got)} tensors ({', '.join(kinds)}) identical to llama.cpp's encoding; "
          f"largest dequantization error {worst:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
