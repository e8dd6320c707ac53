#!/usr/bin/env bash
# Set everything up (idempotent) and run every check: lint, format, unit tests, notebooks (fast mode), browser test.
#   bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# No network in tests: the Hugging Face hub is never contacted (offline loaders fall back to bundled data).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRE_EDU_FAST=1   # notebooks run their fast mode
PY=${VENV:-.venv}/bin/python
echo "[test] ruff"
$PY -m ruff check tre_edu tests benchmarks scripts
$PY -m ruff format --check tre_edu tests benchmarks scripts
echo "[test] pytest (unit tests, browser test, notebooks under nbmake)"
$PY -m pytest --nbmake --nbmake-timeout=300 tests notebooks "$@"
