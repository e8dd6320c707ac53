#!/usr/bin/env bash
# The tail leak on the real task (claim 4 of the paper): the tiny Countdown recipe with a 20,000-token tail,
# global entropy at coef 0.01 vs TRE-K at coef 0.001 (about the same effective weight:
# 0.001 * log(20033) / log 2 = 0.0143), from one warm start, 80 PPO steps each.
#   bash scripts/record_tail_leak.sh
# Results: data/countdown_tail20k/<method>/{summary.json,metrics.jsonl,config.yaml}.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
BIN=${VENV:-.venv}/bin/tre-edu
OUT=data/countdown_tail20k
W=runs/record/warm_tail20k_s0
mkdir -p "$OUT" runs/record
common=(-c configs/countdown_tiny.yaml --seed 0 --tail-tokens 20000 --set threads=1)
[ -f $W/config.json ] || $BIN sft "${common[@]}" --output-dir $W > $W.log 2>&1
run() {
  local name=$1; shift
  $BIN train "${common[@]}" --init-from $W --set sft.enabled=false --steps 80 --set eval.every=20 \
      --set checkpoint_every=0 --output-dir runs/record/tail20k_$name "$@" > runs/record/tail20k_$name.log 2>&1
  mkdir -p $OUT/$name && cp runs/record/tail20k_$name/{summary.json,metrics.jsonl,config.yaml} $OUT/$name/
}
run entropy --kind entropy --coef 0.01 &
run tre-k --kind tre-k --coef 0.001 &
wait
${VENV:-.venv}/bin/python scripts/compact_metrics.py $OUT/*/metrics.jsonl
echo "recorded: $(ls $OUT | tr '\n' ' ')"
