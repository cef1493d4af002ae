"""The one error type a user of qwen3-mlx sees: a single line naming the file, key or value, and the fix."""


class Qwen3Error(Exception):
    """A user-facing error (bad checkpoint, bad option, bad file). The CLI prints it as one line, exit 1."""


class ConfigError(Qwen3Error, ValueError):
    """config.json (or an option) holds a missing or invalid value."""


class OptionError(Qwen3Error, ValueError):
    """An option given by the user is out of range; the CLI reports it as a usage error (exit 2)."""
