"""glassbox: an LLM inference server that opens the engine up for research."""

from glassbox.llm import LLM
from glassbox.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]
