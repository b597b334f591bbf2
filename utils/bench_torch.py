#!/usr/bin/env python3
"""PyTorch reference for `lit-claire bench`: the same synthetic LLaMA, the same steps.

Trains a randomly initialised LlamaForCausalLM (transformers; `--attn sdpa` or
`eager` attention) with AdamW and gradient clipping, full or LoRA (peft; by default
r 16 on q/k/v/o and the MLP), on random tokens, and prints tokens/s, MFU against the
measured f32 matmul peak, and the process's peak RSS so far (ru_maxrss; run one
`--mode` per process for that mode's peak); `--profile` then prints where one more
step's time goes. The flags and defaults are
`lit-claire bench`'s. Not used by the tests; needs `pip install torch transformers peft`.

    RAYON_NUM_THREADS=2 lit-claire bench            # candle
    python3 utils/bench_torch.py --threads 2        # PyTorch, same shapes
"""
import argparse
import resource
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
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    matmul_params = L * per_layer + v * h  # head; the embedding is a lookup
    return 2 * matmul_params + 4 * L * seq * h


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--intermediate", type=int, default=None,
                   help="default: width * 8/3, rounded down to a multiple of 64")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--mode", choices=["full", "lora", "both"], default="both")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2 * rank)")
    p.add_argument("--lora-targets", default="q,k,v,o,mlp",
                   help="comma-separated q, k, v, o, mlp")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, one more under torch.profiler: "
                        "the ops by their own CPU time (compare `lit-claire bench --profile`)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.width,
        intermediate_size=a.intermediate or a.width * 8 // 3 // 64 * 64,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads or a.heads,
        max_position_embeddings=max(a.seq, 256),
        attn_implementation=a.attn,
    )
    names = {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"],
             "mlp": ["gate_proj", "up_proj", "down_proj"]}
    targets = [m for t in a.lora_targets.split(",") for m in names[t.strip()]]
    peak = matmul_gflops(2048, torch.float32)
    print(f"peak {peak:.1f} GFLOP/s (matmul), threads {torch.get_num_threads()}, "
          f"attention {a.attn}")
    modes = ["full", "lora"] if a.mode == "both" else [a.mode]
    for mode in modes:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0,
                           target_modules=targets),
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
              f"{achieved:.1f} GFLOP/s, MFU {100 * achieved / peak:.1f}%, "
              f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
        if a.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
