#!/usr/bin/env bash
# Recreate data/models/tiny-llama-fortunes, the built-in model of `lit-claire demo`:
# random LLaMA weights with the test fixtures' tokenizer, then full pretraining with
# lit-claire on English fortunes (Debian's fortunes-min, BSD licence), so that the demo
# has something to move: its continual pretraining on the Portuguese sample corpus.
#
#   utils/make_tiny_model.sh                 # release build
#   LIT_CLAIRE_PROFILE=dev utils/make_tiny_model.sh
#
# Needs apt-get (any Debian or Ubuntu) to fetch fortunes-min; nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
profile=${LIT_CLAIRE_PROFILE:-release}
target=${CARGO_TARGET_DIR:-target}
if [ "$profile" = release ]; then
    cargo build --release --example init_model --bin lit-claire
    bin_dir=$target/release
else
    cargo build --example init_model --bin lit-claire
    bin_dir=$target/debug
fi
bin=$bin_dir/lit-claire

# The English corpus: the three files of fortunes-min (fortunes, literature, riddles).
(cd "$work" && apt-get download fortunes-min >/dev/null && dpkg-deb -x fortunes-min_*.deb pkg)
mkdir -p "$work/raw/fortunes-en"
for f in fortunes literature riddles; do
    cp "$work/pkg/usr/share/games/fortunes/$f" "$work/raw/fortunes-en/$f.txt"
done

"$bin_dir/examples/init_model" "$work/init" tests/fixtures/reference/llama 4 128 4
$bin prepare-data --source-path "$work/raw" --checkpoint-dir "$work/init" --destination-path "$work/data" \
    --doc-separator % --max-length 128 --padding false --multiple-of 1
$bin pretrain --data-dir "$work/data" --checkpoint-dir "$work/init" --out-dir "$work/run" \
    --num-epochs "${EPOCHS:-12}" --batch-size 16 --micro-batch-size 16 --learning-rate 3e-3 --min-lr 3e-4 \
    --warmup-steps 20 --weight-decay 0.05 --eval-interval 50 --save-interval 100000 --log-interval 10
$bin convert-to-hf --input-path "$work/run/final" --output-dir "$work/hf" --dtype f32
out=data/models/tiny-llama-fortunes
for f in config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json; do
    cp "$work/hf/$f" "$out/$f"
done
tail -n 3 "$work/run/metrics.csv"
echo "wrote $out"
