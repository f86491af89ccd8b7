"""What the command line tells the server beyond the engine: its name for the model, the API key, limits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerSettings:
    model_name: str = "SmolLM2-135M-Instruct"
    api_key: str | None = None
    max_body_bytes: int = 4 << 20  # 4 MiB of JSON is far more than any prompt the context can hold
    ready_message: str | None = None  # printed once the engine runs (the CLI's one line)
