#!/usr/bin/env bash
# The recorded study of issue 13 (the tail leak in real PPO training, the safe range of each method, what drives the
# leak): configs/studies/tail_leak.yaml, 2 worker processes of one thread each. Resumable: stop it any time and run it
# again; finished cells are skipped. Raw lines: data/results/tail_leak/*.jsonl; figures: docs/figures/tail_leak/;
# README: the study table and the claim numbers (scripts/readme_evidence.py).
#   bash scripts/record_tail_leak.sh [workers]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
BIN=${VENV:-.venv}/bin/tre-edu
$BIN study run configs/studies/tail_leak.yaml --workers "${1:-2}"
$BIN study report data/results/tail_leak --figures docs/figures/tail_leak | tee data/results/tail_leak/REPORT.md
# the README's table and the numbers of its four-claim verdicts, from the recorded lines
${VENV:-.venv}/bin/python scripts/readme_evidence.py
