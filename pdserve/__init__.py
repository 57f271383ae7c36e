"""pdserve: LLM serving with prefill/decode disaggregation.

`LLM`, `RequestOutput` and `SamplingParams` load lazily, so light processes (the router)
never import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.engine.llm import LLM, RequestOutput
    from pdserve.engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "RequestOutput"):
        from pdserve.engine import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from pdserve.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'pdserve' has no attribute {name!r}")
