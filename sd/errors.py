"""The exception types `sd` raises for problems the user can fix."""


class SDError(Exception):
    """Bad input or a bad file: the message is one line naming the problem and its fix.

    The CLI prints it without a traceback and exits with `exit_code`.
    """

    exit_code = 2  # as click's usage errors


class NoSettingsError(SDError):
    """An image that carries no settings at all (as opposed to settings sd cannot read)."""

    exit_code = 1
