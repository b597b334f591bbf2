#!/usr/bin/env python3
"""Reference numbers for `adapt-vocab` and `init-model`: transformers on the folders that
`cargo test --test it vocab` builds.

    cargo test --test it vocab::       # builds target/tmp/vocab/<case>/ (fails on a case without references)
    python utils/check_vocab.py        # checks them, writes tests/fixtures/vocab/expected.json
    cargo test --test it vocab::       # lit-claire against those numbers

    pip install torch transformers tokenizers sentencepiece

The cases (defined in tests/it/vocab.rs) are folders under target/tmp/vocab/; `*.base`
folders are bases some cases make first and are skipped. For every case:
- tokenizer: transformers' AutoTokenizer ids of TEXTS, without and with special tokens
  (lit-claire must give the same); for an extended tokenizer, that every base id keeps its
  string, the base's merges come first and the new ids follow the base's; the tokens of the
  corpus (one document per non-empty line) under the base and the new tokenizer;
- for a replaced tokenizer: which new ids have a base token standing for the same bytes or
  holding the same special token or role, decoded here on their own (GPT-2's byte map,
  metaspace, byte fallback), so the test checks those rows were copied;
- model: AutoModelForCausalLM (float32, eager attention) loss on the first 48 ids of
  EVAL_TEXT (labels = inputs, shifted inside the model);
- an init-model folder: mean, std and all-zero rows of every parameter of a model that
  transformers initialises itself from the folder's config.json (torch seed 0).

`--make-inputs` (re)writes tests/fixtures/vocab/added_after/: the reference checkpoints'
byte-level tokenizer with one more special token, id 512, outside the BPE vocabulary (as
LLaMA-3 keeps its special tokens after the model's vocabulary).
"""
import argparse
import json
import sys
from pathlib import Path

import tokenizers
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "target" / "tmp" / "vocab"
FIXTURE = ROOT / "tests" / "fixtures" / "vocab" / "expected.json"
ADDED_AFTER = ROOT / "tests" / "fixtures" / "vocab" / "added_after"
CORPUS = ROOT / "data" / "sample" / "fortunes-br.txt"

TEXTS = [
    "Porque a galinha atravessa a rua? Porque o upstream mandou!",
    "O pão sempre cai com a parte da manteiga para baixo; ação, coração e informação.",
    # (Not starting with a space: transformers' LlamaTokenizer class replaces the
    # tokenizer.json normalizer by a Metaspace that does not prepend to a leading space.)
    "dois  espaços,\ttab e\nnova linha  ",
    "<s>especial</s> no meio <|extra|> do texto",
    "emoji 🙂, 日本語 e ümlaut",
    "",
]
METASPACE = "\u2581"


def corpus_documents() -> list[str]:
    """One document per non-empty line, as lit-claire reads a .txt file by default."""
    lines = CORPUS.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [l[:-1] if l.endswith("\r") else l for l in lines]
    return [l for l in lines if l.strip()]


def eval_text() -> str:
    return CORPUS.read_text(encoding="utf-8")[:300]


def make_inputs() -> None:
    src = ROOT / "tests" / "fixtures" / "reference" / "llama"
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    assert max(tok["model"]["vocab"].values()) == 511
    tok["added_tokens"].append(
        {"id": 512, "content": "<|extra|>", "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
    )
    ADDED_AFTER.mkdir(parents=True, exist_ok=True)
    (ADDED_AFTER / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = ["<|extra|>"]
    (ADDED_AFTER / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    t = AutoTokenizer.from_pretrained(ADDED_AFTER)
    assert t.convert_tokens_to_ids("<|extra|>") == 512 and len(t) == 513, len(t)
    print("wrote", ADDED_AFTER)


def pairs(merges: list) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def all_ids(tok_json: dict) -> dict[str, int]:
    ids = dict(tok_json["model"]["vocab"])
    for a in tok_json["added_tokens"]:
        ids[a["content"]] = a["id"]
    return ids


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def surface_fn(tok_json: dict):
    """The bytes a token of this tokenizer stands for."""
    parts = json.dumps([tok_json.get("pre_tokenizer"), tok_json.get("decoder"), tok_json.get("normalizer")],
                       ensure_ascii=False)
    fallback = bool(tok_json["model"].get("byte_fallback"))
    byte_level = '"ByteLevel"' in parts
    metaspace = not byte_level and ('"Metaspace"' in parts or METASPACE in parts)
    dec = gpt2_byte_decoder()

    def surface(t: str):
        if fallback and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            return bytes([int(t[3:5], 16)])
        if byte_level:
            if any(c not in dec for c in t):
                return None
            return bytes(dec[c] for c in t)
        if metaspace:
            return t.replace(METASPACE, " ").encode()
        return t.encode()

    return surface


def roles(folder: Path, ids: dict[str, int]) -> dict[str, int]:
    p = folder / "tokenizer_config.json"
    cfg = json.loads(p.read_text()) if p.exists() else {}
    out = {}
    for r in ("bos", "eos", "pad", "unk"):
        t = cfg.get(f"{r}_token")
        if isinstance(t, dict):
            t = t.get("content")
        if isinstance(t, str) and t in ids:
            out[r] = ids[t]
    return out


def copied_rows(base: Path, new: Path) -> list[list[int]]:
    """[new id, base id] of every new token that has a base row to copy."""
    bj = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
    nj = json.loads((new / "tokenizer.json").read_text(encoding="utf-8"))
    b_ids, n_ids = all_ids(bj), all_ids(nj)
    b_added = {a["id"] for a in bj["added_tokens"]}
    n_added = {a["id"] for a in nj["added_tokens"]}
    b_surface, n_surface = surface_fn(bj), surface_fn(nj)
    by_bytes = {}
    for t, i in sorted(b_ids.items(), key=lambda x: x[1]):
        if i in b_added:
            continue
        s = b_surface(t)
        if s is not None and s not in by_bytes:
            by_bytes[s] = i
    b_roles, n_roles = roles(base, b_ids), roles(new, n_ids)
    out = []
    for t, i in sorted(n_ids.items(), key=lambda x: x[1]):
        if i in n_added:
            if t in b_ids:
                out.append([i, b_ids[t]])
            else:
                role = next((r for r, j in n_roles.items() if j == i), None)
                if role in b_roles:
                    out.append([i, b_roles[role]])
        else:
            s = n_surface(t)
            if s in by_bytes:
                out.append([i, by_bytes[s]])
    return out


def check_extended(base: Path, folder: Path) -> None:
    bj = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
    nj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    b_ids, n_ids = all_ids(bj), all_ids(nj)
    for t, i in b_ids.items():
        assert n_ids.get(t) == i, f"{folder.name}: base token {t!r} {i} became {n_ids.get(t)}"
    new = sorted(i for t, i in n_ids.items() if t not in b_ids)
    first = max(b_ids.values()) + 1
    assert new == list(range(first, first + len(new))), f"{folder.name}: new ids {new[:5]}..."
    bm, nm = pairs(bj["model"]["merges"]), pairs(nj["model"]["merges"])
    assert nm[: len(bm)] == bm, f"{folder.name}: the base merges do not come first"
    assert len(nm) - len(bm) == len(new), f"{folder.name}: {len(nm) - len(bm)} merges for {len(new)} tokens"
    # The tokenizers library itself agrees with transformers on every text.
    raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(folder)
    for text in TEXTS + corpus_documents()[:200]:
        assert raw.encode(text, add_special_tokens=False).ids == auto(text, add_special_tokens=False).input_ids, text


def tokens_of_corpus(folder: Path) -> int:
    tok = AutoTokenizer.from_pretrained(folder)
    docs = corpus_documents()
    return sum(len(ids) for ids in tok(docs, add_special_tokens=False).input_ids)


def loss_of(folder: Path, ids: list[int]) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        return model(input_ids=x, labels=x).loss.item()


def init_stats(folder: Path) -> dict:
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = {}
    for name, p in model.named_parameters():
        p = p.detach().double()
        zero_rows = [] if p.dim() != 2 else torch.nonzero((p == 0).all(dim=1)).flatten().tolist()
        out[name] = {"shape": list(p.shape), "mean": p.mean().item(), "std": p.std(unbiased=False).item(),
                     "zero_rows": zero_rows}
    return out


def check_case(folder: Path) -> dict:
    tok = AutoTokenizer.from_pretrained(folder)
    exp = {
        "ids": [tok(t, add_special_tokens=False).input_ids for t in TEXTS],
        "ids_special": [tok(t).input_ids for t in TEXTS],
    }
    ids = tok(eval_text()).input_ids[:48]
    exp["input_ids"] = ids
    exp["loss"] = loss_of(folder, ids)
    record_path = folder / "vocab_adaptation.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        base = Path(record["base_model"])
        if record["mode"] == "extend":
            check_extended(base, folder)
        else:
            exp["copied"] = copied_rows(base, folder)
        tpb = record.get("tokens_per_byte")
        if tpb is not None:
            exp["tokens_per_byte"] = {
                "bytes": sum(len(d.encode()) for d in corpus_documents()),
                "base_tokens": tokens_of_corpus(base),
                "new_tokens": tokens_of_corpus(folder),
            }
    else:
        exp["params"] = init_stats(folder)
    return exp


def dumps(v, indent: str = "") -> str:
    """JSON with objects one key a line and lists on one line: small, and diffs by key."""
    if isinstance(v, dict) and v:
        inner = indent + " "
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {dumps(x, inner)}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    return json.dumps(v, ensure_ascii=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--make-inputs", action="store_true", help="rewrite tests/fixtures/vocab/added_after/")
    ap.add_argument("--cases", type=Path, default=CASES, help="$CARGO_TARGET_TMPDIR/vocab of the test run")
    args = ap.parse_args()
    if args.make_inputs:
        make_inputs()
        return
    cases_dir = args.cases
    folders = sorted(d for d in cases_dir.iterdir() if d.is_dir() and not d.name.endswith(".base")) if cases_dir.exists() else []
    if not folders:
        sys.exit(f"no cases in {cases_dir}: run `cargo test --test it vocab::` first")
    cases = {}
    for d in folders:
        cases[d.name] = check_case(d)
        print(f"{d.name}: loss {cases[d.name]['loss']:.6f}", file=sys.stderr)
    out = {
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
        "texts": TEXTS,
        "cases": cases,
    }
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(dumps(out) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size // 1024} KB, {len(cases)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
