"""Expected failures: the CLI prints them as one line and exits non-zero (no traceback)."""


class MicroLMError(Exception):
    """A failure the user can fix: missing file, bad config, unusable input."""


class ConfigError(MicroLMError):
    """A config file or override that does not match the schema."""
