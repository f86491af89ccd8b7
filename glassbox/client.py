"""A small Python client for the glassbox server (sync and streaming).

    from glassbox.client import Client
    client = Client("http://127.0.0.1:8000")
    print(client.generate("The sky is", max_tokens=16, temperature=0)["text"])
    for event in client.stream("Tell me a story", max_tokens=64):
        print(event["text"], end="", flush=True)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx


class ClientError(Exception):
    """The server answered with an error; `status` and `message` are its."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.param = status, message, param


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 600) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the design's API
    def generate(self, prompt: str | list[int], **params: Any) -> dict[str, Any]:
        """{"text", "token_ids", "finish_reason", "usage", "timings", ...}; params are sampler fields."""
        return self._post("/generate", {"prompt": prompt, **params})

    def stream(self, prompt: str | list[int], **params: Any) -> Iterator[dict[str, Any]]:
        """One event per step: {"text": new text, "token_ids": new ids, "finished"}; the last has "result"."""
        with self._http.stream("POST", "/generate", json={"prompt": prompt, **params, "stream": True}) as response:
            if response.status_code >= 400:
                response.read()
                self._raise(response)
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    yield json.loads(line[len("data: ") :])

    def batch_generate(self, prompts: list[str | list[int]], **params: Any) -> list[dict[str, Any]]:
        return self._post("/batch_generate", {"prompts": prompts, **params})["results"]

    def tokenize(self, text: str, with_pieces: bool = False) -> dict[str, Any]:
        return self._post("/tokenize", {"text": text, "with_pieces": with_pieces})

    def detokenize(self, tokens: list[int]) -> str:
        return self._post("/detokenize", {"tokens": tokens})["text"]

    def model_info(self) -> dict[str, Any]:
        return self._get("/model_info")

    def health(self) -> bool:
        return self._http.get("/health").status_code == 200

    def metrics(self) -> str:
        response = self._http.get("/metrics")
        self._raise(response)
        return response.text

    # ---- plumbing
    def _post(self, path: str, body: dict[str, Any]) -> Any:
        response = self._http.post(path, json=body)
        self._raise(response)
        return response.json()

    def _get(self, path: str) -> Any:
        response = self._http.get(path)
        self._raise(response)
        return response.json()

    @staticmethod
    def _raise(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            error = response.json()["error"]
            raise ClientError(response.status_code, error["message"], error.get("param"))
        except (ValueError, KeyError, TypeError):
            raise ClientError(response.status_code, response.text) from None
