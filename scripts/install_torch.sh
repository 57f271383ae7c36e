#!/usr/bin/env bash
# torch 2.13.0 into the interpreter $1 (the project venv's): PyPI's CUDA build where an NVIDIA GPU
# answers, else the CPU build, found without depending on download.pytorch.org when pip's own
# configuration already knows one. A venv reads the same pip configuration as the system
# interpreter (/etc/pip.conf, ~/.config/pip/pip.conf, PIP_* variables: find-links, extra
# indexes), so a CPU wheel provided that way (this machine: /opt/wheels) is found from inside it.
set -euo pipefail
PY=${1:-python3}
V=2.13.0
if "$PY" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$V')" 2>/dev/null; then
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    exec "$PY" -m pip install "torch==$V"
fi
# 1. a CPU wheel pip's configuration provides locally (find-links): torch itself from there, its
#    dependencies from the usual indexes
if "$PY" -m pip install --no-index --no-deps "torch==$V" >/dev/null 2>&1; then
    exec "$PY" -m pip install "torch==$V"
fi
# 2. PyTorch's CPU index (PyPI's Linux wheel is the CUDA build, gigabytes of libraries unused here)
if "$PY" -m pip install --timeout 30 --retries 1 "torch==$V" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple; then
    exit 0
fi
# 3. whatever pip's configuration finds
exec "$PY" -m pip install "torch==$V"
