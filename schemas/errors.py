"""The errors a caller can cause, as the domain names them. The store and the import parsers raise
them; `service/errors.py` is the one place that turns them into HTTP statuses, and the CLI prints
their message. `code` and `param` travel to OpenAI's error shape as they are."""


class DomainError(Exception):
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code


class NotFound(DomainError, LookupError):
    """The row asked for does not exist (or is not the caller's to see: the same answer)."""
    code = "not_found"


class Conflict(DomainError):
    """Well-formed, but it contradicts the current state (a status change that does not apply, a
    reused idempotency key, a row that exists already)."""
    code = "conflict"


class Invalid(DomainError, ValueError):
    """A well-formed request that breaks a rule, or a value the database cannot hold."""
    code = "invalid_value"


class Unavailable(DomainError):
    """The database cannot be reached right now; the caller may retry."""
    code = "database_unavailable"
