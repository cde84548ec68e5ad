"""What can go wrong when talking to a cloud server, as errors callers can tell apart."""

from __future__ import annotations


class CloudError(RuntimeError):
    """A request failed; the message says what the server said or why it could not be reached."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class CloudUnavailable(CloudError):
    """The server could not be reached, timed out, or kept failing after the retries."""
