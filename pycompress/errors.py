"""The one exception type users see: a one-line message naming what is wrong."""


class PycompressError(Exception):
    """An error caused by the user's input (file, node, argument).

    The CLI prints ``str(error)`` on one line and exits non-zero; anything
    else escaping is a bug and is shown with its traceback under ``--debug``.
    """
