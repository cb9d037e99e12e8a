"""Errors a user can cause and fix. The CLI prints their message and exits non-zero without a traceback."""


class JisuError(Exception):
    """Base of every error whose message is meant for the user."""


class ModelLoadError(JisuError):
    """The model path is missing, unreadable, truncated or corrupt."""


class UnsupportedModelError(JisuError):
    """The checkpoint is readable but holds an architecture or tensor type jisu does not run."""


class InvalidRequestError(JisuError, ValueError):
    """A prompt or sampling parameter is out of range; the message names the field and what is allowed."""


class ContextLengthError(InvalidRequestError):
    """The prompt, or the prompt plus max_tokens, does not fit in the model's context window."""


class ModelConfigError(ModelLoadError):
    """A model config value (config.json or GGUF metadata) is missing, of the wrong type, out of range, or
    disagrees with the tensors in the files; the message names the file, the field, its value and what is allowed."""
