#!/bin/bash
# perplexity (561 tokens, model load included) and generate (48 new tokens) on the real
# model (tests/fixtures/real/smollm2-135m: python3 utils/make_real_model.py), two
# builds alternating, three rounds:
#   BEFORE=/path/to/old/lit-claire [NOW=target/release/lit-claire] utils/compare_inference.sh
# (docs/benchmarks.md: the flash kernel against the plain attention, two builds).
cd "$(dirname "$0")/.."
M=tests/fixtures/real/smollm2-135m
head -c 1500 data/sample/fortunes-br.txt > "${TMPDIR:-/tmp}/lc-ppl.txt"
for r in 1 2 3; do
  for b in "${BEFORE:?set BEFORE to the older binary}" "${NOW:-target/release/lit-claire}"; do
    name=$([[ $b == "$BEFORE" ]] && echo before || echo now)
    t0=$(date +%s.%N)
    out=$(RAYON_NUM_THREADS=2 $b perplexity --checkpoint-dir $M --input "${TMPDIR:-/tmp}/lc-ppl.txt" --format json 2>/dev/null)
    t1=$(date +%s.%N)
    g=$(RAYON_NUM_THREADS=2 $b generate --checkpoint-dir $M --prompt "Once upon a time, in a small village by the sea," --max-new-tokens 48 --format json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["tokens_per_s"],1))')
    echo "$name round $r: perplexity wall $(echo "$t1 - $t0" | bc) s ($(echo $out | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["tokens"], "tokens, loss", round(d["loss"],4))')); generate $g tokens/s; load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
