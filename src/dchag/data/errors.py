"""The error a data source raises for malformed data: one line naming the file and the problem."""

from dchag.config import ConfigError


class DataError(ConfigError):
    """Malformed or mismatched data; the CLI prints it in one line and exits with status 2."""
