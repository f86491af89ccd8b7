"""glassbox: an LLM inference server that opens the engine up for research."""

__version__ = "0.1.0"
