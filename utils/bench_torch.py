#!/usr/bin/env python3
"""PyTorch reference for `lit-claire bench`: the same synthetic LLaMA, the same steps.

Trains a randomly initialised LlamaForCausalLM (transformers, eager attention) with
AdamW and gradient clipping, full or LoRA (peft, r 16 on q/k/v/o and the MLP), on
random tokens, and prints tokens/s and MFU against the measured f32 matmul peak.
Not used by the tests; needs `pip install torch transformers peft`.

    RAYON_NUM_THREADS=2 lit-claire bench            # candle
    python3 utils/bench_torch.py --threads 2        # PyTorch, same shapes
"""
import argparse
import time

import torch


def matmul_gflops(n, dtype):
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def flops_per_token(cfg, seq):
    h, v, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    inter = cfg.intermediate_size
    per_layer = 4 * h * h + 3 * h * inter
    matmul_params = L * per_layer + v * h  # head; the embedding is a lookup
    return 2 * matmul_params + 4 * L * seq * h


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--mode", choices=["full", "lora", "both"], default="both")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.width,
        intermediate_size=a.width * 8 // 3 // 64 * 64,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        max_position_embeddings=max(a.seq, 256),
        attn_implementation="eager",
    )
    peak = matmul_gflops(2048, torch.float32)
    print(f"peak {peak:.1f} GFLOP/s (matmul), threads {torch.get_num_threads()}")
    modes = ["full", "lora"] if a.mode == "both" else [a.mode]
    for mode in modes:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                           "gate_proj", "up_proj", "down_proj"]),
            )
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

        def step():
            ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1))
            out = model(input_ids=ids[:, :-1], labels=None)
            loss = torch.nn.functional.cross_entropy(
                out.logits.reshape(-1, a.vocab), ids[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(a.warmup):
            step()
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        secs = time.perf_counter() - t
        tokens = a.steps * a.batch * a.seq
        achieved = 3 * flops_per_token(cfg, a.seq) * tokens / secs / 1e9
        n = sum(p.numel() for p in model.parameters())
        print(f"train-{mode:<5} {n} params, 32-true: {tokens / secs:.0f} tokens/s, "
              f"{achieved:.1f} GFLOP/s, MFU {100 * achieved / peak:.1f}%")


if __name__ == "__main__":
    main()
