"""Tokenizer: the `tokenizers` library over a model folder's `tokenizer.json`, plus its chat template.

Kept free of transformers so a warm start does not pay for importing it. Special-token handling (BOS)
lives in tokenizer.json's post-processor, as in transformers' fast tokenizers.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from glassbox.errors import ModelLoadError


class Tokenizer:
    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer as FastTokenizer

        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(
                f"no tokenizer.json in {folder}; glassbox needs the fast-tokenizer file that "
                "`transformers` writes with tokenizer.save_pretrained()"
            )
        self._tok = FastTokenizer.from_file(str(tokenizer_file))
        self.config: dict[str, Any] = _read_json(folder / "tokenizer_config.json")
        self.chat_template: str | None = _chat_template(folder, self.config)
        self._compiled_template: Any = None
        self.bos_token: str | None = _token_text(self.config.get("bos_token"))
        self.eos_token: str | None = _token_text(self.config.get("eos_token"))
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        """The token as the vocabulary spells it (e.g. 'Ġthe' for byte-level BPE)."""
        return self._tok.id_to_token(token_id) or ""

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a list of {"role", "content"} messages, rendered like transformers does."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead of messages")
        if self._compiled_template is None:  # compiled once, on first use
            self._compiled_template = _compile_template(self.chat_template)
        return self._compiled_template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # The template writes any BOS itself, so no special tokens are added on top (as transformers does).
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(token: Any) -> str | None:
    """tokenizer_config.json spells special tokens as strings or as AddedToken dicts."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    # transformers 5 writes chat_template.jinja; older versions put it in tokenizer_config.json.
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _compile_template(source: str) -> Any:
    """A sandboxed Jinja template with the helpers chat templates expect (as in transformers)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
