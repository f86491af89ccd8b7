"""Error types. Each says what went wrong and what to do; the CLI prints the message alone."""

from __future__ import annotations


class GlassboxError(Exception):
    """Base class of the errors glassbox raises on purpose."""


class ModelLoadError(GlassboxError):
    """The model could not be found, read or understood."""


class UnsupportedModelError(ModelLoadError):
    """The model exists but its architecture or a setting of it is not implemented."""


class FieldError(GlassboxError, ValueError):
    """A request field the engine cannot take: `field` names it (the API's `param`), the message says why
    and what is allowed."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason

    def renamed(self, field: str) -> FieldError:
        """The same error under the name the caller used for the field (input_ids, token_ids, texts[2])."""
        return FieldError(field, self.reason)


class RankLostError(RuntimeError):
    """A rank of a tensor-parallel group died or cannot be reached (engine/tp_group.py): the engine cannot
    go on."""
