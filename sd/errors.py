"""The exception types `sd` raises for problems the user can fix."""


class SDError(Exception):
    """Bad input or a bad file: the message is one line naming the problem and its fix.

    The CLI prints it without a traceback and exits with `exit_code`.
    """

    exit_code = 2  # as click's usage errors


def counted(number: float, noun: str) -> str:
    """`number` `noun`s, in words fit for a message: "1 image", "2 images", "0.5 GPUs", "2 CPUs" (of 2.0)."""
    written = int(number) if float(number).is_integer() else number
    return f"{written} {noun}" + ("" if number == 1 else "s")


class NoSettingsError(SDError):
    """An image that carries no settings at all (as opposed to settings sd cannot read)."""

    exit_code = 1
