"""The one exception type the CLI turns into a one-line message (exit code 2)."""


class VitlabError(ValueError):
    """A problem with the user's input (bad path, corrupt file, mismatched weights, ...).

    Subclasses ValueError so library callers can catch either.
    """


def check_fields(cls: type, d: dict, what: str, *, ignore: tuple[str, ...] = ()) -> None:
    """Refuse keys of `d` that are not fields of dataclass `cls` (a typo must not be silently dropped)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known - set(ignore))
    if unknown:
        raise VitlabError(f"unknown {what} fields {unknown}; known fields: {sorted(known)}")
