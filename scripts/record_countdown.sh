#!/usr/bin/env bash
# Recorded Countdown comparison (the data behind notebooks/04_countdown.ipynb and the README table):
# one warm start per seed, then PPO with each method from that warm start, two runs at a time (one thread each).
#   bash scripts/record_countdown.sh [seeds] [methods]
# Results: data/countdown_runs/<method>_s<seed>/{summary.json,metrics.jsonl,config.yaml}; warm starts in runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-"0 1 2"}
METHODS=${2:-"none entropy tre-k tre-p"}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
BIN=${VENV:-.venv}/bin/tre-edu
OUT=data/countdown_runs
mkdir -p "$OUT" runs/record
for s in $SEEDS; do
  [ -f runs/record/warm_s$s/config.json ] || $BIN sft -c configs/countdown_tiny.yaml --seed "$s" --set threads=1 \
      --output-dir runs/record/warm_s$s > runs/record/warm_s$s.log 2>&1 &
done
wait
jobs=()
for s in $SEEDS; do
  for m in $METHODS; do
    d=$OUT/${m}_s$s
    [ -f "$d/summary.json" ] && continue
    $BIN train -c configs/countdown_tiny.yaml --seed "$s" --kind "$m" --init-from runs/record/warm_s$s \
        --set sft.enabled=false --set threads=1 --set checkpoint_every=0 --output-dir "runs/record/${m}_s$s" \
        > "runs/record/${m}_s$s.log" 2>&1 \
      && mkdir -p "$d" && cp runs/record/${m}_s$s/{summary.json,metrics.jsonl,config.yaml} "$d/" &
    jobs+=($!)
    if [ ${#jobs[@]} -ge 2 ]; then wait "${jobs[0]}"; jobs=("${jobs[@]:1}"); fi
  done
done
wait
${VENV:-.venv}/bin/python scripts/compact_metrics.py $OUT/*/metrics.jsonl
echo "recorded: $(ls $OUT | tr '\n' ' ')"
