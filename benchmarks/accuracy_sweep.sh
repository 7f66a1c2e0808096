#!/usr/bin/env bash
# Side-by-side accuracy of model variants on the Debian demo data (the figures in the performance notes).
#
#   bash benchmarks/accuracy_sweep.sh [OUT_DIR]        (needs data/debian: python -m trainer data debian --out data/debian)
#
# Each variant trains configs/demo.toml with one change, 1 thread, no checkpoints or TensorBoard, one shared data
# cache; prints "variant valid_accuracy test_accuracy train_seconds" lines.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/accuracy-sweep}
mkdir -p "$OUT"

run() {
  local name=$1
  shift
  rm -rf "${OUT:?}/$name"
  python -m trainer train --config configs/demo.toml --run.dir "$OUT/$name" --checkpoint.at_epoch_end false \
    --data.cache_dir "$OUT/cache" --metrics.tensorboard false --metrics.projector_words 0 --train.threads 1 "$@" \
    2>"$OUT/$name.log" |
    python -c "import json, sys; r = json.load(sys.stdin); print('$name', r['valid']['accuracy'], r['test']['accuracy'], round(r['train_seconds'], 1))"
}

run bag_unigram --model.encoder bag --embeddings.ngram_buckets 0
run bag_bigram --model.encoder bag
run masked_unigram --embeddings.ngram_buckets 0
run masked_bigram
run bag_bigram_char --model.encoder bag --embeddings.char_ngrams 500000
run masked_bigram_char --embeddings.char_ngrams 500000
run masked_bigram_unfreeze --embeddings.unfreeze_after_steps 300 --optim.pretrained_lr 0.005
