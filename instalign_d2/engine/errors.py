"""The error of a config value that cannot work (its own module, so that any part may raise it)."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and the fix."""
