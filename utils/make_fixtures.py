#!/usr/bin/env python3
"""Write the "unseen" checkpoints of tests/fixtures/extra/ and PEFT's LoRA gradients.

The six reference checkpoints (tests/fixtures/reference/, read its README) fix one
layout per family. The model must agree with PyTorch on *any* checkpoint of these
families, so this script builds more, each with a layout the reference lacks (other
widths, head sizes, grouped heads, rope bases and scalings, windows, block layouts,
bf16 storage, sharding), with Hugging Face's own classes, and records what PyTorch
computes on them in the reference's format:

    tests/fixtures/extra/<name>/
        config.json, model.safetensors (or shards + model.safetensors.index.json),
        generation_config.json, tokenizer.json, tokenizer_config.json
        expected.json          input_ids, loss, greedy ids, 8 training losses, what it
                               exercises, and `cli`: what `lit-claire perplexity` and
                               `generate --temperature 0` must give on a text and a prompt
        ref_logits.safetensors "logits" [T, vocab] for input_ids
        ref_grads.safetensors  d loss / d parameter, keyed by the model's parameter names
    tests/fixtures/extra/lora_grads/<family>.safetensors
        d loss / d lora_A and lora_B of each reference family's PEFT adapter, keyed by the
        adapter file's names (base_model.model.<module>.lora_A.weight)

Everything is float32 with eager attention; a checkpoint stored in bf16 is reloaded and
computed in float32 on the upcast weights. Seeded, so reruns give the same numbers.
CI has no Python: the outputs are committed and the Rust tests (tests/it/unseen.rs,
tests/it/lora_grads.rs) only read them.

    python3 utils/make_fixtures.py            # needs torch, transformers 5, peft, safetensors
"""

import json
import random
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
import peft
import transformers
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    GPT2Config,
    GPTNeoConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
)

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests/fixtures/reference"
EXTRA = ROOT / "tests/fixtures/extra"
CORPUS = ROOT / "data/sample/fortunes-br.txt"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]
FAMILIES = ["llama", "mistral", "falcon", "gpt2", "gpt_neox", "gpt_neo"]

VOCAB = 512
SEQ = 32  # tokens of input_ids: longer than every window below
PROMPT = 8  # greedy decoding: prompt length ...
NEW = 16  # ... and new tokens (prompt + new > every window)
SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

# 8 steps of full fine-tuning, as the reference's expected.json describes them.
TRAIN = dict(
    optimizer="AdamW",
    lr=1e-3,
    betas=[0.9, 0.95],
    eps=1e-8,
    weight_decay=0.1,
    clip_grad_norm=1.0,
    schedule="constant",
    pad_id_ignored=0,
)
TRAIN_STEPS = 8
TRAIN_ROW = 25  # ids per row: inputs ids[:-1], targets ids[1:]

# name -> (config class, config kwargs, options, what it exercises).
# options: dtype "bfloat16" (or "float16") stores the weights in that dtype; shard "24KB"
# saves shards of at most that size; config_4x rewrites config.json the transformers 4.x way.
VARIANTS = {
    "llama_gqa_bias": (
        LlamaConfig,
        dict(hidden_size=36, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
             head_dim=12, intermediate_size=48, attention_bias=True,
             rope_parameters=dict(rope_type="default", rope_theta=500000.0),
             rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=128),
        dict(),
        "grouped-query attention (6 heads, 2 kv heads), head_dim 12 with 6*12 != hidden 36, "
        "rope_theta 500000, biases on q/k/v/o, untied head; 5.x config (rope_parameters)",
    ),
    "llama3_tied": (
        LlamaConfig,
        dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             head_dim=24, intermediate_size=48, rms_norm_eps=1e-5, tie_word_embeddings=True,
             max_position_embeddings=256,
             rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                  low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=64)),
        dict(config_4x=True),
        "llama3 rope scaling (original context 64, so frequencies fall in all three bands), "
        "head_dim 24, tied embeddings; 4.x config (rope_theta, rope_scaling, torch_dtype)",
    ),
    "mistral_swa5": (
        MistralConfig,
        dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=1,
             head_dim=8, intermediate_size=48, sliding_window=5, tie_word_embeddings=True,
             max_position_embeddings=128),
        dict(),
        "sliding window 5 over 32 tokens, 8 query heads sharing 1 kv head, head_dim 8 "
        "(8*8 != hidden 48), tied embeddings",
    ),
    "falcon_new_gqa": (
        FalconConfig,
        dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=8, num_kv_heads=2,
             new_decoder_architecture=True, num_ln_in_parallel_attn=2, parallel_attn=True,
             multi_query=False, bias=True, ffn_hidden_size=64, alibi=False,
             tie_word_embeddings=True, max_position_embeddings=128),
        dict(),
        "Falcon-40B layout: new_decoder_architecture, fused qkv grouped per kv head "
        "(8 heads, 2 kv heads, head_dim 6), separate ln_attn / ln_mlp, biases everywhere",
    ),
    "falcon_sequential": (
        FalconConfig,
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=False,
             ffn_hidden_size=64, alibi=False, tie_word_embeddings=False,
             max_position_embeddings=128),
        dict(),
        "Falcon with multi_query false and parallel_attn false: per-head [q, k, v] fused "
        "layout, sequential residual with post_attention_layernorm, untied lm_head",
    ),
    "gpt_neox_sequential": (
        GPTNeoXConfig,
        dict(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=64,
             rotary_pct=0.5, rotary_emb_base=500.0, use_parallel_residual=False,
             hidden_act="gelu_new", tie_word_embeddings=False, max_position_embeddings=128),
        dict(),
        "GPT-NeoX with half the head (6 of 12 dims) rotating, rotary base 500, sequential "
        "residual (use_parallel_residual false), gelu_new; 5.x config",
    ),
    "gpt2_inverse_layer": (
        GPT2Config,
        dict(n_embd=36, n_layer=3, n_head=3, n_inner=56, n_positions=64,
             scale_attn_by_inverse_layer_idx=True, activation_function="gelu",
             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        dict(),
        "scores also divided by layer index + 1 (scale_attn_by_inverse_layer_idx), "
        "n_inner 56 (not 4x), 3 layers, erf gelu, head_dim 12",
    ),
    "gpt_neo_local5": (
        GPTNeoConfig,
        dict(hidden_size=36, num_layers=3, num_heads=3, intermediate_size=56,
             attention_types=[[["local", "global"], 1], [["local"], 1]], window_size=5,
             max_position_embeddings=64, resid_dropout=0.0, embed_dropout=0.0,
             attention_dropout=0.0),
        dict(),
        "attention_types [[[local, global], 1], [[local], 1]]: layers local, global, local "
        "with window 5 over 32 tokens, head_dim 12",
    ),
    "mistral_bf16": (
        MistralConfig,
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, sliding_window=None, tie_word_embeddings=False,
             max_position_embeddings=128),
        dict(dtype="bfloat16"),
        "weights stored in bf16 (references computed in float32 on the upcast weights), "
        "sliding_window null (global attention)",
    ),
    "falcon_sharded": (
        FalconConfig,
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False,
             ffn_hidden_size=128, alibi=False, tie_word_embeddings=True,
             max_position_embeddings=128),
        dict(shard="24KB"),
        "sharded: model.safetensors.index.json and several shards (Falcon-7B layout, "
        "multi-query, head_dim 8)",
    ),
}


def documents():
    """The sample corpus's documents (separated by lines holding `%`)."""
    docs, cur = [], []
    for line in CORPUS.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.strip() == "%":
            docs.append("".join(cur))
            cur = []
        else:
            cur.append(line)
    docs.append("".join(cur))
    return [d for d in docs if d.strip()]


def spread_weights(model, seed):
    """Norm weights 1 +/- 0.2, biases +/- 0.1, matrices N(0, 0.08): layout bugs show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            u = torch.rand(p.shape, generator=g) * 2 - 1
            if name.endswith(".bias"):
                p.copy_(u * 0.1)
            elif p.ndim == 1:
                p.copy_(1 + u * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)


def to_4x_config(path):
    """Rewrite a 5.x config.json with the 4.x keys (rope_theta, rope_scaling, torch_dtype)."""
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters", None)
    if rope is not None:
        rope = dict(rope)
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = "4.44.2"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_f32(path):
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def lm_loss(model, ids):
    """Mean next-token cross-entropy of `ids` ([B, T]); targets 0 are padding."""
    logits = model(input_ids=ids).logits.float()
    return logits, F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
        ignore_index=TRAIN["pad_id_ignored"],
    )


def greedy(model, prompt, n, stop=None):
    """Greedy decoding without a cache: the plain truth. Stops after `stop` if given."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
            if ids[-1] == stop:
                break
    return ids[len(prompt):]


def windowed_loss(model, ids, context):
    """Mean next-token loss of `ids` scored in windows of `context` tokens overlapping by
    one, so every token after the first is predicted once (as `lit-claire perplexity`)."""
    total, count, start = 0.0, 0, 0
    with torch.no_grad():
        while start + 1 < len(ids):
            w = ids[start:start + context]
            logits = model(input_ids=torch.tensor([w])).logits[0].float()
            total += F.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum").item()
            count += len(w) - 1
            start += context - 1
    return total / count


def cli_expectations(model, tok, docs, rng):
    """What `lit-claire perplexity --format json` and `generate --temperature 0` must
    give: a run of documents as the corpus file stores them (longer than the context, so
    it is scored in several windows), tokenized as the tokenizer does by itself, and a
    one-line prompt."""
    context = model.config.max_position_embeddings
    i = rng.randrange(len(docs))
    text = docs[i]
    while len(tok.encode(text).ids) < context + context // 2:
        i = (i + 1) % len(docs)
        text += "%\n" + docs[i]
    ids = tok.encode(text).ids
    prompt = docs[rng.randrange(len(docs))].strip().splitlines()[0][:40].strip()
    prompt_ids = tok.encode(prompt).ids
    return dict(
        perplexity=dict(text=text, context=context, tokens=len(ids),
                        loss=windowed_loss(model, ids, context)),
        generate=dict(prompt=prompt, prompt_ids=prompt_ids, max_new_tokens=NEW,
                      new_ids=greedy(model, prompt_ids, NEW, stop=SPECIAL["eos_token_id"])),
    )


def train_losses(model, batches):
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], betas=tuple(TRAIN["betas"]),
                            eps=TRAIN["eps"], weight_decay=TRAIN["weight_decay"])
    losses = []
    for k in range(TRAIN_STEPS):
        _, loss = lm_loss(model, torch.tensor(batches[k % len(batches)]))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["clip_grad_norm"])
        opt.step()
    return losses


def pick_texts(tok, docs, rng):
    """An eval text of at least SEQ tokens, and 4 batches of 2 rows of TRAIN_ROW ids (one
    row of each batch from a short document, so padding occurs)."""
    enc = [tok.encode(d).ids for d in docs]
    long_ = [i for i, e in enumerate(enc) if len(e) >= SEQ + 8]
    short = [i for i, e in enumerate(enc) if 6 <= len(e) < TRAIN_ROW - 4]
    ev = rng.choice(long_)
    batches = []
    for b in range(4):
        rows = [enc[rng.choice(long_)][:TRAIN_ROW]]
        second = enc[rng.choice(short)] if b % 2 else enc[rng.choice(long_)]
        second = second[:TRAIN_ROW]
        rows.append(second + [TRAIN["pad_id_ignored"]] * (TRAIN_ROW - len(second)))
        batches.append(rows)
    return docs[ev], enc[ev][:SEQ], batches


def make_variant(name, cls, kwargs, opts, exercises, seed, tok, docs):
    out = EXTRA / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    cfg = cls(vocab_size=VOCAB, **SPECIAL, **kwargs)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    spread_weights(model, seed)
    if "dtype" in opts:
        model = model.to(getattr(torch, opts["dtype"]))
    save = dict(safe_serialization=True)
    if "shard" in opts:
        save["max_shard_size"] = opts["shard"]
    model.save_pretrained(out, **save)
    if opts.get("config_4x"):
        to_4x_config(out / "config.json")
    for f in TOKENIZER_FILES:
        shutil.copy(REFERENCE / "llama" / f, out / f)

    # Everything below reads the folder back, as a user's checkpoint.
    model = load_f32(out)
    rng = random.Random(seed)
    eval_text, ids, batches = pick_texts(tok, docs, rng)
    x = torch.tensor([ids])
    logits, loss = lm_loss(model, x)
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().contiguous() for n, p in model.named_parameters()}
    save_file({"logits": logits[0].detach().contiguous()}, out / "ref_logits.safetensors")
    save_file(grads, out / "ref_grads.safetensors")
    new_ids = greedy(model, ids[:PROMPT], NEW)
    cli = cli_expectations(model, tok, docs, rng)
    losses = train_losses(load_f32(out).train(), batches)
    expected = dict(
        name=name,
        family=cfg.model_type,
        architectures=list(model.config.architectures or []),
        exercises=exercises,
        eval_text=eval_text,
        input_ids=ids,
        loss=loss.item(),
        greedy_prompt_ids=ids[:PROMPT],
        greedy_new_ids=new_ids,
        train=dict(TRAIN, batches=batches, losses=losses),
        cli=cli,
    )
    (out / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{name:22} loss {loss.item():.4f}  {size / 1024:.0f} KiB  {exercises[:60]}...")
    return size


def make_lora_grads(family):
    """d loss / d (lora_A, lora_B) of the reference adapter, computed by PEFT."""
    ref = REFERENCE / family
    exp = json.loads((ref / "expected.json").read_text())
    model = PeftModel.from_pretrained(load_f32(ref), ref / "lora", is_trainable=True).eval()
    _, loss = lm_loss(model, torch.tensor([exp["input_ids"]]))
    assert abs(loss.item() - exp["lora"]["loss"]) < 1e-5, (family, loss.item())
    loss.backward()
    grads = {
        n.replace(".default.", "."): p.grad.detach().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    saved = set(safe_open(ref / "lora/adapter_model.safetensors", "pt").keys())
    assert set(grads) == saved, (family, sorted(set(grads) ^ saved))
    out = EXTRA / "lora_grads"
    out.mkdir(parents=True, exist_ok=True)
    save_file(grads, out / f"{family}.safetensors")
    print(f"lora_grads/{family}: {len(grads)} tensors, loss {loss.item():.6f}")


def main():
    torch.use_deterministic_algorithms(True)
    tok = Tokenizer.from_file(str(REFERENCE / "llama" / "tokenizer.json"))
    docs = documents()
    total = 0
    for seed, (name, (cls, kwargs, opts, exercises)) in enumerate(VARIANTS.items(), start=1):
        total += make_variant(name, cls, kwargs, opts, exercises, 1000 + seed, tok, docs)
    for fam in FAMILIES:
        make_lora_grads(fam)
    index = dict(
        transformers=transformers.__version__,
        torch=torch.__version__,
        peft=peft.__version__,
        variants={n: v[3] for n, v in VARIANTS.items()},
    )
    (EXTRA / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"total {total / 1024:.0f} KiB in {len(VARIANTS)} checkpoints")


if __name__ == "__main__":
    main()
