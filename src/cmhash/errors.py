"""Errors a user can cause. The CLI prints them as one line and exits non-zero (no traceback)."""


class CmhashError(Exception):
    """Base class: a mistake in settings, data or usage that the user can fix."""


class ConfigError(CmhashError):
    """A bad value in params.yaml or on the command line."""


class DataError(CmhashError):
    """Missing, unreadable or inconsistent input data."""
