"""One error hierarchy: every message says what happened, why, and what to do.

The CLI prints `str(err)` without a traceback and exits with `err.exit_code`, so each
class has its own code and scripts can tell a bad checkpoint from a missing backend.
"""


class OmedgeError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n  -> {hint}")


class UsageError(OmedgeError):
    exit_code = 2


class CheckpointError(OmedgeError):
    exit_code = 3


class ExportError(OmedgeError):
    exit_code = 4


class ParityError(OmedgeError):
    exit_code = 5


class InputError(OmedgeError):
    exit_code = 6


class BackendUnavailableError(OmedgeError):
    exit_code = 7


class BundleIntegrityError(OmedgeError):
    exit_code = 8
