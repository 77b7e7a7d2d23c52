"""User-facing errors: the CLI prints these as one clear message (no traceback) and exits non-zero."""


class UserError(Exception):
    """Something the user can fix: bad input, a missing model, a bad config key."""


class NonFiniteLossError(UserError):
    """A NaN or inf loss: the run stops, the last good checkpoint stays as it was."""
