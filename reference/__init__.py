"""nano-vLLM Labs' reference engine: a small, readable LLM inference engine.

    from reference import LLM, SamplingParams
    llm = LLM("smollm2")
    print(llm.generate("What is the capital of France?", SamplingParams(temperature=0))[0].outputs[0].text)
"""

from .engine import LLMEngine
from .llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput"]
