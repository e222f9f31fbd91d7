"""Errors that strata reports to the user as one clear message, never a traceback."""


class StrataError(Exception):
    """A problem the user can fix; the message says what and how."""


class DefinitionError(StrataError):
    """The image definition is invalid; holds every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid image definition:\n" + "\n".join(f"  - {p}" for p in problems))
