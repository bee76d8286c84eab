"""Typed errors of the core. Every interface maps InvalidRequest to its own status code."""


class InvalidRequest(ValueError):
    """A request field has a bad value. `field` names it, so every boundary can report it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # pickles with both fields (Ray carries it across processes)
        return InvalidRequest, (self.field, self.message)


class Unavailable(RuntimeError):
    """A component failed (a target rank died): the request ended early and may be retried.
    Interfaces map it to UNAVAILABLE / HTTP 503."""

    def __reduce__(self):
        return Unavailable, (str(self),)
