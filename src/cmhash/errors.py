"""Errors a user can cause. The CLI prints them as one line and exits non-zero (no traceback)."""


class CmhashError(Exception):
    """Base class: a mistake in settings, data or usage that the user can fix."""


class ConfigError(CmhashError):
    """A bad value in params.yaml or on the command line."""


class DataError(CmhashError):
    """Missing, unreadable or inconsistent input data."""


class DiskError(CmhashError):
    """An output could not be written (read-only folder, full disk); the previous one is kept."""

    def __init__(self, path, reason: OSError | str) -> None:
        self.path, self.reason = path, reason if isinstance(reason, str) else reason.strerror or str(reason)
        super().__init__(f"cannot write {path}: {self.reason}")
