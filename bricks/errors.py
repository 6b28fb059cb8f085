"""User-facing errors.

Every problem a user can fix (bad path, unsupported architecture, empty data,
mismatched BrickSet, ...) is raised as a `BricksError` whose message is one line
saying what is wrong and what to do. The CLI turns it into a non-zero exit.
"""


class BricksError(Exception):
    """A problem with the user's input, explained in one line."""

    def __init__(self, message: str):
        # Keep the message on one line: it is printed as-is by the CLI.
        super().__init__(" ".join(str(message).split()))
