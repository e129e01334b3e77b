"""Errors the CLI turns into one clear line (plus the fix) instead of a traceback."""

from __future__ import annotations

# Exit codes are part of the CLI contract: scripts and schedulers branch on them.
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: traceback printed
EXIT_USER = 2  # bad config, missing file, corrupt input: nothing was done
EXIT_PARTIAL = 3  # the run finished but some units (shards, files) failed; they are listed
EXIT_BUSY = 4  # another run holds the lock
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A mistake the user can fix; rendered as ``error: <message>`` and ``fix: <fix>``.

    Args:
        message: What is wrong, naming the field/file and the bad value.
        fix: What to do about it.
        exit_code: Process exit code the CLI returns.
    """

    def __init__(self, message: str, fix: str | None = None, exit_code: int = EXIT_USER):
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message} (fix: {self.fix})"


class PartialFailure(Exception):
    """Some independent units of work failed after retries; the rest were committed."""

    def __init__(self, message: str, failures: dict[str, str]):
        super().__init__(message)
        self.message = message
        self.failures = failures
