#!/usr/bin/env python3
"""Fixtures for training new tokens' rows beside a LoRA adapter, checked by PEFT.

An "adapted" base is a reference checkpoint (tests/fixtures/reference/<family>/) whose
vocabulary grew from 512 to 576 rows, as `lit-claire adapt-vocab` grows one: rows
512..519 are 8 new tokens (seeded random values, the embeddings' and, untied, the
head's), rows 520..575 padding (zeros); its tokenizer is the reference one with 8
added tokens, and `vocab_adaptation.json` lists the new ids. Only what differs from
the reference is committed; the Rust tests (tests/it/vocab_training.rs) build the
same folder from it, and so does this script:

    tests/fixtures/vocab_training/
        tokenizer.json            the reference tokenizer + 8 added tokens
        <family>/new_rows.safetensors
                                  "embed" [8, 64] (and "head" [8, 64], untied)
        <family>/peft/            PEFT's own adapter: LoRA r4 + trainable tokens
                                  (random values), as PEFT saves it
        <family>/ours/            an adapter lit-claire trained (3 steps,
                                  --train-embeddings new), as it saved it
        <family>/expected.json
            input_ids         24 ids, new ones among them
            loss              the adapted base's loss on them (transformers)
            peft_loss         with PEFT's adapter (PEFT), and after PEFT's
            peft_merged_loss  merge_and_unload
            ours_loss         with our adapter, loaded by PEFT, and after merging it,
            ours_merged_loss  saving the merged model with the tokenizer and loading
                              both again with AutoModelForCausalLM / AutoTokenizer

Run in three steps (CI has no Python: the outputs are committed):

    python3 utils/make_vocab_fixtures.py base      # rows, tokenizer, PEFT's adapter, losses
    cargo test --test it vocab_training::write_our_adapters -- --ignored
    python3 utils/make_vocab_fixtures.py ours      # PEFT's losses on our adapters

and, for any adapter trained on an adapted folder, `check`: the loss PEFT gives with
it (and merged) on ids given as a JSON list:

    python3 utils/make_vocab_fixtures.py check BASE_DIR ADAPTER_DIR '[1, 2, 3]'
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests/fixtures/reference"
OUT = ROOT / "tests/fixtures/vocab_training"
FAMILIES = ["llama", "gpt2", "gpt_neox"]
BASE_VOCAB, NEW, VOCAB = 512, 8, 576
NEW_IDS = list(range(BASE_VOCAB, BASE_VOCAB + NEW))
NEW_TOKENS = ["ção", "mentalmente", "ões", "nh", "lh", "quixotesco", "ável", "ência"]
# Where the embeddings and the head of each family are stored, and their module
# names for PEFT (transformers 5 calls GPT-NeoX's embed_out lm_head).
STORED = {
    "llama": ("model.embed_tokens.weight", "lm_head.weight"),
    "gpt2": ("transformer.wte.weight", None),
    "gpt_neox": ("gpt_neox.embed_in.weight", "embed_out.weight"),
}
MODULES = {"llama": ("embed_tokens", "lm_head"), "gpt2": ("wte", None), "gpt_neox": ("embed_in", "lm_head")}
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"]}


def input_ids(family):
    """The reference's 24 ids with five of them replaced by new ones."""
    ids = json.loads((REFERENCE / family / "expected.json").read_text())["input_ids"]
    for k, pos in enumerate([3, 7, 11, 15, 19]):
        ids[pos] = NEW_IDS[k]
    return ids


def adapted_dir(family, dest):
    """The adapted base of `family` in `dest`, from the committed rows and tokenizer."""
    src = REFERENCE / family
    dest.mkdir(parents=True, exist_ok=True)
    for f in ["generation_config.json", "tokenizer_config.json"]:
        shutil.copy(src / f, dest / f)
    shutil.copy(OUT / "tokenizer.json", dest / "tokenizer.json")
    config = json.loads((src / "config.json").read_text())
    config["vocab_size"] = VOCAB
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(src / "model.safetensors")
    rows = load_file(OUT / family / "new_rows.safetensors")
    for name, key in zip(STORED[family], ["embed", "head"]):
        if name is None:
            continue
        w = tensors[name]
        pad = torch.zeros(VOCAB - BASE_VOCAB - NEW, w.shape[1], dtype=w.dtype)
        tensors[name] = torch.cat([w, rows[key], pad]).contiguous()
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    record = {
        "mode": "extend", "init": "mean", "base_model": family, "base_vocab_size": BASE_VOCAB,
        "base_tokenizer_size": BASE_VOCAB, "vocab_size": VOCAB, "tokenizer_size": BASE_VOCAB + NEW,
        "new_token_ids": NEW_IDS, "new_merges": 0, "copied_rows": 0, "tokens_per_byte": None,
    }
    (dest / "vocab_adaptation.json").write_text(json.dumps(record, indent=2))
    return dest


def loss_of(model, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, :-1].float()
    return F.cross_entropy(logits, x[0, 1:]).item()


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()


def base():
    torch.manual_seed(2024)
    OUT.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(REFERENCE / "llama" / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, normalized=False) for t in NEW_TOKENS])
    assert [tok.token_to_id(t) for t in NEW_TOKENS] == NEW_IDS
    tok.save(str(OUT / "tokenizer.json"))
    for family in FAMILIES:
        fam = OUT / family
        fam.mkdir(exist_ok=True)
        rows = {"embed": torch.randn(NEW, 64) * 0.08}
        if STORED[family][1] is not None:
            rows["head"] = torch.randn(NEW, 64) * 0.08
        save_file(rows, fam / "new_rows.safetensors")
        with tempfile.TemporaryDirectory() as tmp:
            folder = adapted_dir(family, Path(tmp) / "base")
            ids = input_ids(family)
            model = load(folder)
            expected = {"input_ids": ids, "loss": loss_of(model, ids), "new_token_ids": NEW_IDS}
            embed, head = MODULES[family]
            indices = {embed: NEW_IDS} if head is None else {embed: NEW_IDS, head: NEW_IDS}
            cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family],
                             trainable_token_indices=indices)
            pm = get_peft_model(model, cfg)
            with torch.no_grad():
                for name, p in pm.named_parameters():
                    if p.requires_grad:
                        p.add_(torch.randn_like(p) * 0.05)
            pm.eval()
            expected["peft_loss"] = loss_of(pm, ids)
            shutil.rmtree(fam / "peft", ignore_errors=True)
            pm.save_pretrained(fam / "peft")
            (fam / "peft" / "README.md").unlink()
            merged = pm.merge_and_unload()
            expected["peft_merged_loss"] = loss_of(merged, ids)
            (fam / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
            print(family, expected)


def peft_losses(base_dir, adapter_dir, ids):
    """PEFT's loss with the adapter, and transformers' after merging, saving the merged
    model with the base's tokenizer and loading both again."""
    model = load(base_dir)
    pm = PeftModel.from_pretrained(model, adapter_dir).eval()
    loss = loss_of(pm, ids)
    merged = pm.merge_and_unload()
    with tempfile.TemporaryDirectory() as tmp:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
        again = load(tmp)
        tok = AutoTokenizer.from_pretrained(tmp)
        assert len(tok) == BASE_VOCAB + NEW, len(tok)
        merged_loss = loss_of(again, ids)
    return loss, merged_loss


def ours():
    for family in FAMILIES:
        fam = OUT / family
        expected = json.loads((fam / "expected.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            folder = adapted_dir(family, Path(tmp) / "base")
            loss, merged = peft_losses(folder, fam / "ours", expected["input_ids"])
        expected["ours_loss"], expected["ours_merged_loss"] = loss, merged
        (fam / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
        print(family, loss, merged)


def check(base_dir, adapter_dir, ids):
    loss, merged = peft_losses(base_dir, adapter_dir, ids)
    print(json.dumps({"loss": loss, "merged_loss": merged}))


if __name__ == "__main__":
    match sys.argv[1:]:
        case ["base"]:
            base()
        case ["ours"]:
            ours()
        case ["check", b, a, ids]:
            check(b, a, json.loads(ids))
        case _:
            sys.exit(__doc__)
