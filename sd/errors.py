"""The one exception type `sd` raises for problems the user can fix."""


class SDError(Exception):
    """Bad input or a bad file: the message is one line naming the problem and its fix.

    The CLI prints it without a traceback and exits with code 2.
    """
