#!/usr/bin/env bash
# Side-by-side accuracy of model variants on the Debian demo data (the figures in the performance notes).
#
#   bash benchmarks/accuracy_sweep.sh [OUT_DIR]        (needs data/debian: python -m trainer data debian --out data/debian)
#
# Each variant trains configs/demo.toml (sparse tables on plain SGD, lr 3000) with one change, 1 thread, no checkpoints or TensorBoard, one shared data
# cache; prints "variant valid_accuracy test_accuracy train_seconds" lines.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/accuracy-sweep}
mkdir -p "$OUT"

run() {
  local name=$1
  shift
  rm -rf "${OUT:?}/$name"
  python -m trainer train --config configs/demo.toml --run.dir "$OUT/$name" --checkpoint.enabled false \
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
run masked_bigram_unfreeze --embeddings.unfreeze_after_steps 300 --optim.pretrained_lr 30
# the optimizer choice (the demo's default moved from sparse_adam 0.02 to sgd 3000)
run masked_sparse_adam --optim.sparse sparse_adam --optim.sparse_lr 0.02
run masked_sgd_lr300 --optim.sparse_lr 300
run masked_sgd_lr1000 --optim.sparse_lr 1000
run masked_sgd_lr10000 --optim.sparse_lr 10000
run bag_bigram_sparse_adam --model.encoder bag --optim.sparse sparse_adam --optim.sparse_lr 0.02
run masked_epochs8 --train.epochs 8
run masked_concat --model.combine concat
run masked_concat_char --model.combine concat --embeddings.char_ngrams 500000
run masked_hidden256 --model.hidden 256 --model.dropout 0.2
run masked_buckets2m --embeddings.ngram_buckets 2000000
run masked_seed1 --train.seed 1
run masked_seed2 --train.seed 2
