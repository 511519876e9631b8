"""Errors a user can act on. Each message names the problem and the fix."""


class QwenkitError(Exception):
    """Base class for every error qwenkit raises on purpose."""


class ConfigError(QwenkitError, ValueError):
    """A config.json / GGUF header is missing a key or holds a bad value."""


class CheckpointError(QwenkitError):
    """A weights file is missing, truncated, corrupt or does not fit the config."""


class UnsupportedModelError(QwenkitError):
    """The checkpoint is of an architecture qwenkit does not run."""


class DownloadError(QwenkitError):
    """A hub id could not be downloaded."""


class DataError(QwenkitError, ValueError):
    """A training data file or one of its records is malformed; the message names the file and line."""


class RequestError(QwenkitError, ValueError):
    """A generation request breaks a rule (qwenkit.generate.make_request); `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class ContextLengthError(RequestError):
    """The prompt, or the prompt plus the new tokens asked for, does not fit the model's context."""


class AdapterError(QwenkitError, ValueError):
    """A LoRA setting is invalid, or an adapter directory is unreadable or does not fit the model."""
