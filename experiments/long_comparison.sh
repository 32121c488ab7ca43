#!/usr/bin/env bash
# The long architecture comparison on the embedded default (SmolLM2-135M, blocks.6.hook_resid_post): caches,
# then every architecture at each k over several seeds, with a per-architecture learning rate chosen on a
# validation slice, thresholds calibrated on contexts spread over the training cache, CE/KL with paired 95%
# intervals against TopK.
#
#   nohup bash experiments/long_comparison.sh > runs/long/log.txt 2>&1 &
#
# Resumable: every step reuses what is finished (caches continue after their last shard, finished runs are
# reused), so rerunning the same command continues after an interruption. The numbers in the README's claim
# table come from this script; its sizes are set by the variables below (override them in the environment).
# The default corpus holds ~2.07M tokens, so the five caches (1.35M tokens) never overlap.
#
# The >= 2M-token check at k=32 of the README (no gradient caches; the long CE pass for TopK and MC+pts only):
#   CORPUS=default-large CACHE_TOKENS=2200000 TOKENS=2097152 KS=32 WITH_GRADS=0 \
#       CLAIM_RUNS="topk mutual_choice+per_token_standardize" OTHER_RUNS= OUT=runs/long2m \
#       nohup bash experiments/long_comparison.sh > runs/long2m.log 2>&1 &
# The same at k=64 with every run type in the long CE pass (the README's run, 2026-12-07):
#   CORPUS=default-large CACHE_TOKENS=2200000 TOKENS=2097152 KS=64 WITH_GRADS=0 OUT=runs/long2m64 \
#       nohup bash experiments/long_comparison.sh > runs/long2m64.log 2>&1 &
# The same at k=16 with every run type in the long CE pass (OTHER_RUNS left at its default does the third pass; the
# README's run did it as a second invocation with CLAIM_RUNS="feature_choice feature_choice+zipf mutual_choice+aux_zipf"):
#   CORPUS=default-large CACHE_TOKENS=2200000 TOKENS=2097152 KS=16 WITH_GRADS=0 OUT=runs/long2m16 \
#       nohup bash experiments/long_comparison.sh > runs/long2m16.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/long}
HOOK=blocks.6.hook_resid_post
CORPUS=${CORPUS:-default}             # default-large (4.18M tokens) for caches beyond default's ~2.07M
N_FEATURES=${N_FEATURES:-2304}        # 4 x d_model
KS=${KS:-"32 16 64"}                 # k=32 first: the claim table
SEEDS=${SEEDS:-"0 1 2"}
TOKENS=${TOKENS:-524288}              # per run: half a pass over the training cache (each row seen once)
GRADS_TOKENS=${GRADS_TOKENS:-196608}  # g-SAE and its TopK baseline: two passes over the gradient cache
CE_TOKENS=${CE_TOKENS:-4096}          # CE/KL of every run (the Pareto curves over k)
CLAIM_CE_TOKENS=${CLAIM_CE_TOKENS:-102400}  # CE/KL of the claim table's k: 800 contexts, 101,600 scored tokens
CLAIM_K=${KS%% *}                     # the first k: the claim table (and the learning-rate choice)

CACHE_TOKENS=${CACHE_TOKENS:-1100000}  # the training cache
WITH_GRADS=${WITH_GRADS:-1}           # 0: no gradient caches, no g-SAE runs
CONTEXT=128

# contexts of 128 tokens: training (8594 by default), then held-out 1024, held-out with gradients 128, gradients 768
TRAIN_CONTEXTS=$(( (CACHE_TOKENS + CONTEXT - 1) / CONTEXT ))
$BIN/saewb cache --corpus "$CORPUS" --hooks $HOOK --tokens "$CACHE_TOKENS" --out $OUT/cache --quiet
$BIN/saewb cache --corpus "$CORPUS" --hooks $HOOK --tokens 131072 --skip-contexts $TRAIN_CONTEXTS \
    --out $OUT/cache-eval --quiet
GRADS_ARGS=()
if [ "$WITH_GRADS" = 1 ]; then
    $BIN/saewb cache --corpus "$CORPUS" --hooks $HOOK --tokens 16384 --skip-contexts $((TRAIN_CONTEXTS + 1024)) \
        --with-grads --batch-size 16 --out $OUT/cache-eval-grads --quiet
    $BIN/saewb cache --corpus "$CORPUS" --hooks $HOOK --tokens 98304 --skip-contexts $((TRAIN_CONTEXTS + 1152)) \
        --with-grads --batch-size 16 --out $OUT/cache-grads --quiet
    GRADS_ARGS=(--grads-activations $OUT/cache-grads --eval-grads-activations $OUT/cache-eval-grads
                --grads-total-tokens "$GRADS_TOKENS")
    CLAIM_RUNS=${CLAIM_RUNS:-"topk mutual_choice mutual_choice+per_token_standardize gradient_topk topk@grads-cache"}
else
    CLAIM_RUNS=${CLAIM_RUNS:-"topk mutual_choice mutual_choice+per_token_standardize"}
fi
OTHER_RUNS=${OTHER_RUNS-"feature_choice feature_choice+zipf mutual_choice+aux_zipf"}  # set but empty: no CE pass

compare() {
    # shellcheck disable=SC2086  # KS and SEEDS are lists
    $BIN/python -m experiments.compare \
        --activations $OUT/cache --eval-activations $OUT/cache-eval "${GRADS_ARGS[@]}" \
        --n-features "$N_FEATURES" --seeds $SEEDS --total-tokens "$TOKENS" \
        --lr-multipliers 0.5 1 2 --lr-select-tokens 131072 --eval-tokens 65536 --validation-rows 32768 \
        --out $OUT/compare "$@"
}
# Every run, CE/KL on CE_TOKENS; then the claim table's k again on CLAIM_CE_TOKENS (the runs of one pass scored
# together, one shared clean forward per batch, on the same first contexts; g-SAE and its TopK on the whole held-out
# gradient cache): first TopK and the runs of the ΔCE claims, then the others; then the report. A ΔCE difference
# pairs only runs scored on the same tokens.
# shellcheck disable=SC2086
compare --k $KS --ce-tokens "$CE_TOKENS"
# shellcheck disable=SC2086
compare --k "$CLAIM_K" --ce-tokens "$CLAIM_CE_TOKENS" --runs $CLAIM_RUNS
# shellcheck disable=SC2086
[ -z "$OTHER_RUNS" ] || compare --k "$CLAIM_K" --ce-tokens "$CLAIM_CE_TOKENS" --runs $OTHER_RUNS
# shellcheck disable=SC2086
compare --k $KS --ce-tokens "$CE_TOKENS" --report-only
