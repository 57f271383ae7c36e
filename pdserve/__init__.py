"""pdserve: LLM serving with prefill/decode disaggregation."""

from pdserve.engine.llm import LLM, RequestOutput
from pdserve.engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
