"""Errors a user can cause. The CLI prints them as one line each and exits with code 2."""


class UserError(Exception):
    """A mistake in the user's data, paths or flags: shown without a traceback."""

    def __init__(self, message: str, details: list[str] | None = None):
        super().__init__(message)
        self.details = details or []

    def lines(self) -> list[str]:
        return [str(self), *self.details]
