#!/usr/bin/env bash
# Set everything up (idempotent) and open the notebooks in JupyterLab.
#   bash scripts/lab.sh [extra jupyter lab args, e.g. --no-browser --port 8889]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
extra=()
[ "$(id -u)" = "0" ] && extra+=(--allow-root)   # JupyterLab refuses to run as root without it
exec "${VENV:-.venv}/bin/jupyter" lab notebooks/ "${extra[@]}" "$@"
