"""The one exception every command turns into a one-line error."""


class LoadError(Exception):
    """A model folder, Hub id, file or option that cannot be used; the message says why."""


def one_line(e: Exception) -> str:
    """An exception's message on one line, cut to a readable length."""
    return " ".join(str(e).split())[:400]
