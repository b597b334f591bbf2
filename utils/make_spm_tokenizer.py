#!/usr/bin/env python3
"""Write tests/fixtures/spm_tokenizer/: a SentencePiece tokenizer as Llama-2 and Mistral ship it.

Those models' Hugging Face folders hold `tokenizer.model` (a SentencePiece BPE model with
byte fallback) and the `tokenizer.json` that transformers converts from it: a BPE model
with `byte_fallback`, `<0xXX>` byte tokens, `▁` for spaces and merges ordered by piece
score. `lit-claire quantize` must turn such a tokenizer.json into llama.cpp's "llama"
(SentencePiece) vocabulary; the fixture lets tests/it/publish_gguf.rs check that without
downloading a 7B model. The vocabulary (512) fits the reference checkpoints' embeddings.

    python3 utils/make_spm_tokenizer.py     # needs sentencepiece, transformers 5
"""

import json
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "spm_tokenizer"


def main() -> None:
    corpus = ROOT / "data" / "sample" / "fortunes-br.txt"
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "spm"
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(prefix),
            model_type="bpe",
            vocab_size=512,
            byte_fallback=True,
            character_coverage=0.995,  # rare characters go through the byte tokens
            split_digits=True,
            bos_id=1,
            eos_id=2,
            unk_id=0,
            pad_id=-1,
            num_threads=1,
            normalization_rule_name="identity",  # as Llama-2's: text kept as written
            remove_extra_whitespaces=False,
        )
        OUT.mkdir(parents=True, exist_ok=True)
        shutil.copy(f"{prefix}.model", OUT / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(OUT / "tokenizer.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, p in enumerate(pieces)}
    # transformers' conversion: every split of a piece into two pieces is a merge, ranked
    # by the merged piece's score (its id), then by the parts' ids.
    merges = sorted(
        ((vocab[p], vocab[p[:k]], vocab[p[k:]]), (p[:k], p[k:]))
        for p in pieces
        for k in range(1, len(p))
        if p[:k] in vocab and p[k:] in vocab and sp.is_control(vocab[p]) is False
    )
    backend = Tokenizer(
        models.BPE(vocab, [m for _, m in merges], unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.save_pretrained(OUT)
    for extra in ("special_tokens_map.json", "chat_template.jinja"):
        (OUT / extra).unlink(missing_ok=True)
    config = json.loads((OUT / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False, legacy=True)
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # The conversion is exact: the fast tokenizer gives SentencePiece's ids on every line.
    for line in corpus.read_text(encoding="utf-8").splitlines():
        assert backend.encode(line).ids == [1] + sp.encode(line), line
    data = json.loads((OUT / "tokenizer.json").read_text())
    print("model", data["model"]["type"], "byte_fallback", data["model"].get("byte_fallback"),
          "vocab", len(data["model"]["vocab"]), "merges", len(data["model"]["merges"]))
    print("normalizer", json.dumps(data.get("normalizer"))[:200])
    print("pre_tokenizer", json.dumps(data.get("pre_tokenizer"))[:200])
    print("decoder", json.dumps(data.get("decoder"))[:200])
    s = "Olá, mundo! [Intervenant 1:] 1234 ça va? 日本"
    print(tok.tokenize(s))
    assert tok(s)["input_ids"] == [1] + sp.encode(s)


if __name__ == "__main__":
    main()
