#!/usr/bin/env python3
"""Write tests/fixtures/extra/llama_massive: a tiny LLaMA with what a trained model has
and a random one lacks.

On SmolLM2-135M (`utils/make_real_model.py`) our loss was 1.1e-4 below transformers' on
every text. Two things there never occur in the tiny random checkpoints:

- massive activations: a few residual channels near 2e4 at the first token;
- confident predictions over a large vocabulary: after the max logit's exp(0) = 1, tens
  of thousands of exp(x - max) below 2^-24. A running float32 sum drops each of them
  (1 + 2^-24 rounds back to 1), so the fused cross-entropy lost their mass, about 1e-4
  of log-sum-exp, in every row. That was the cause.

This checkpoint plants both, with weights crafted on top of make_fixtures.py's spread:
the embedding row of the text's first token carries +12000 and -9000 in two channels;
every embedding has 8.0 in channel 0, and the (untied) head is zero except for one token
whose weight on channel 0 puts its logit at 16.72 in every other row, so each row holds one
probability near 1 and 3071 of exp(-16.72) = 5.5e-8, just under 2^-24 (5.96e-8). The old
kernel is off by ~1.6e-4 in loss here (the script checks that with a float32 emulation of
it), the fixed one by < 1e-6. The weights are stored in bf16 (values exact in bf16) to keep
the folder small; everything is computed in float32 on them, as for the other fixtures.

    python3 utils/make_massive_fixture.py     # needs what make_fixtures.py needs

The folder has the format of the other fixtures (tests/fixtures/extra/README.md) and
gets their checks in tests/it/unseen.rs.
"""

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (helpers and constants shared with the others)

NAME = "llama_massive"
SEED = 2009
VOCAB = 3072  # large enough that the dropped mass exceeds the 1e-4 tolerance
SEQ = 16  # tokens of input_ids (the logits are [SEQ, VOCAB]: kept small)
PEAK_TOKEN = 100  # the confident prediction; a low id, so the sum meets its 1.0 early
PEAK_LOGIT = 16.72  # exp(-16.72) = 5.5e-8 < 2^-24 = 5.96e-8
CONST_CH, MASSIVE = 0, {5: 12000.0, 11: -9000.0}
EXERCISES = (
    "massive activations (residual channels 5 and 11 at +12000 / -9000 on the first "
    "token) and confident predictions over 3072 tokens: 3071 probabilities of 5.5e-8, "
    "under 2^-24 next to the top one's 1, that a float32 running sum drops; "
    "GQA 2:1, rope_theta 1e5, untied head, bf16 storage"
)


def pick_text(tok, docs, rng):
    """An eval text whose first token does not come back in its first SEQ ids."""
    enc = [tok.encode(d).ids for d in docs]
    ok = [i for i, e in enumerate(enc) if len(e) >= SEQ + 8 and e[0] not in e[1:SEQ]]
    ev = rng.choice(ok)
    return docs[ev], enc[ev][:SEQ]


def final_norm_channel(model, ids):
    """Channel CONST_CH of the final norm's output, for every position of `ids`."""
    got = {}
    h = model.model.norm.register_forward_hook(lambda m, i, o: got.setdefault("n", o))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    h.remove()
    return got["n"][0, :, CONST_CH]


def old_kernel_nll(logits, targets):
    """The old fused cross-entropy, emulated: exp(x - max) summed in a running float32."""
    out = []
    for row, t in zip(logits.astype(np.float32), targets):
        m = row.max()
        s = np.float32(0)
        for v in np.exp(row - m).astype(np.float32):
            s = np.float32(s + v)
        out.append(float(np.log(s)) + float(m) - float(row[t]))
    return np.array(out)


def exact_nll(logits, targets):
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
    return lse - x[np.arange(len(targets)), targets]


def main():
    torch.use_deterministic_algorithms(True)
    tok = Tokenizer.from_file(str(mf.REFERENCE / "llama" / "tokenizer.json"))
    docs = mf.documents()
    rng = random.Random(SEED)
    eval_text, ids = pick_text(tok, docs, rng)

    torch.manual_seed(SEED)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, intermediate_size=32, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="default", rope_theta=100000.0),
        tie_word_embeddings=False, max_position_embeddings=64, **mf.SPECIAL,
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    mf.spread_weights(model, SEED)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, CONST_CH] = 8.0
        for ch, v in MASSIVE.items():
            emb[ids[0], ch] = v
        # Small writes into the residual stream, so channel 0 keeps the final norm steady.
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.125)
            layer.mlp.down_proj.weight.mul_(0.125)
        model.lm_head.weight.zero_()
        model.to(torch.bfloat16).float()  # round to what the bf16 file will hold
        n = final_norm_channel(model, ids)
        # One weight: the peak token's logit is PEAK_LOGIT where channel 0 leads (every
        # row but the massive first one, whose logits stay ~0).
        w = torch.tensor(PEAK_LOGIT / n[1:].median().item()).to(torch.bfloat16).float()
        model.lm_head.weight[PEAK_TOKEN, CONST_CH] = w

    out = mf.EXTRA / NAME
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    for f in mf.TOKENIZER_FILES:
        shutil.copy(mf.REFERENCE / "llama" / f, out / f)

    # From here on, the folder as a user's checkpoint reads it.
    model = mf.load_f32(out)
    x = torch.tensor([ids])
    with torch.no_grad():
        hidden = model(input_ids=x, output_hidden_states=True).hidden_states
    residual = max(h[0, 0].abs().max().item() for h in hidden[:-1])
    logits, loss = mf.lm_loss(model, x)
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().contiguous() for n, p in model.named_parameters()}
    save_file({"logits": logits[0].detach().contiguous()}, out / "ref_logits.safetensors")
    save_file(grads, out / "ref_grads.safetensors")

    # The crafted property, and that it defeats a float32 running sum.
    lg = logits[0, :-1].detach().numpy()
    tg = np.array(ids[1:])
    top = lg[1:].max(axis=1)
    old_gap = old_kernel_nll(lg, tg).mean() - exact_nll(lg, tg).mean()
    assert residual > 8000, residual
    assert 16.64 < top.min() and top.max() < 16.9, (top.min(), top.max())
    assert old_gap < -1.2e-4, old_gap
    new_ids = mf.greedy(model, ids[: mf.PROMPT], mf.NEW)
    cli = mf.cli_expectations(model, tok, docs, rng)
    _, _, batches = mf.pick_texts(tok, docs, rng)
    losses = mf.train_losses(mf.load_f32(out).train(), batches)
    expected = dict(
        name=NAME,
        family=cfg.model_type,
        architectures=list(model.config.architectures or []),
        exercises=EXERCISES,
        eval_text=eval_text,
        input_ids=ids,
        loss=loss.item(),
        greedy_prompt_ids=ids[: mf.PROMPT],
        greedy_new_ids=new_ids,
        train=dict(mf.TRAIN, batches=batches, losses=losses),
        cli=cli,
    )
    (out / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{NAME}: loss {loss.item():.6f}, max |residual| at token 0 {residual:.0f}, top logits "
          f"{top.min():.4f}..{top.max():.4f}; a float32 running sum is off by {old_gap:.2e}; "
          f"{size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
