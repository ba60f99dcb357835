"""The error the whole package raises for bad configuration (one line, exit code 2 from the CLI).

Its own module so that :mod:`pirl.config` and :mod:`pirl.presets` can both raise it without
importing each other.
"""


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range (one-line message)."""
