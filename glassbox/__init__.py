"""glassbox: an LLM inference server that opens the engine up for research.

`LLM` and `SamplingParams` are imported on first use, so that `import glassbox.models...` stays light
and lower layers never pull in the engine.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from glassbox.llm import LLM
    from glassbox.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from glassbox.llm import LLM

        return LLM
    if name == "SamplingParams":
        from glassbox.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'glassbox' has no attribute {name!r}")
