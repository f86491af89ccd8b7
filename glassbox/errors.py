"""Error types. Each says what went wrong and what to do; the CLI prints the message alone."""


class GlassboxError(Exception):
    """Base class of the errors glassbox raises on purpose."""


class ModelLoadError(GlassboxError):
    """The model could not be found, read or understood."""


class UnsupportedModelError(ModelLoadError):
    """The model exists but its architecture or a setting of it is not implemented."""
