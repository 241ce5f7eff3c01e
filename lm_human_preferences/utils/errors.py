"""The one exception type for problems a user can fix."""


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and what to do.

    Command-line entry points print it as one line and exit non-zero instead of
    showing a traceback.
    """


class Stopped(BaseException):
    """The run stopped on a signal, with a checkpoint to resume from; the command exits with
    128 + the signal's number, as a process killed by it would."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
