#!/usr/bin/env bash
# g-SAE at a >=200k-row gradient cache: eval-grads 800 contexts (CE/KL on ~101.6k tokens), grads 1600 contexts.
# Resumable: finished caches and runs are reused (rerun the same command after an interruption).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=${OUT:-runs/gsae-204800}
HOOK=blocks.6.hook_resid_post
date
$BIN/saewb cache --hooks $HOOK --tokens 204800 --skip-contexts 9618 --with-grads --batch-size 16 --out $OUT/cache-grads --quiet
date
$BIN/saewb cache --hooks $HOOK --tokens 102400 --skip-contexts 11218 --with-grads --batch-size 16 --out $OUT/cache-eval-grads --quiet
date
compare() {
    $BIN/python -m experiments.compare \
        --activations $OUT/cache-grads --eval-activations $OUT/cache-eval-grads \
        --grads-activations $OUT/cache-grads --eval-grads-activations $OUT/cache-eval-grads \
        --runs gradient_topk topk@grads-cache \
        --n-features 2304 --seeds 0 1 2 --grads-total-tokens 393216 \
        --lr-multipliers 0.5 1 2 --lr-select-tokens 131072 --eval-tokens 65536 --validation-rows 32768 \
        --out $OUT/compare "$@"
}
# Every k on the same ~101.6k held-out tokens (2026-12-07). The 2026-12-02 run scored k = 32 on these and k = 16, 64
# on 4,096 only; CE_TOKENS=4096 gives that short pass back.
compare --k 32 16 64 --ce-tokens "${CE_TOKENS:-102400}"
date
