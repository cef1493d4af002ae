"""The one error type a user of qwen3-mlx sees: a single line naming the file, key or value, and the fix."""


class Qwen3Error(Exception):
    """A user-facing error (bad checkpoint, bad option, bad file). The CLI prints it as one line, exit 1."""


class ConfigError(Qwen3Error, ValueError):
    """A checkpoint's config.json holds a missing or invalid value (never raised for what a caller passes)."""


class OptionError(Qwen3Error, ValueError):
    """A value the caller gave (an option, a dtype, a message) is invalid; the CLI reports it as a usage error
    (exit 2)."""


class ContextLengthError(Qwen3Error):
    """The prompt (or the prompt and the least response asked for) does not fit in the model's context."""


class MemoryLimitError(Qwen3Error):
    """A request that could never fit in the memory it may use (the KV budget), even alone."""
