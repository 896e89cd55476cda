"""The one exception type the CLI turns into a one-line message (exit code 2)."""


class VitlabError(ValueError):
    """A problem with the user's input (bad path, corrupt file, mismatched weights, ...).

    Subclasses ValueError so library callers can catch either.
    """
