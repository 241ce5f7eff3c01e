"""The one exception type for problems a user can fix."""


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and what to do.

    Command-line entry points print it as one line and exit non-zero instead of
    showing a traceback.
    """
