"""The one base class of errors caused by what a user asked for (bad path, size, prompt...).

Command-line tools print these as a single `error: ...` line; anything else is a bug and
keeps its traceback.
"""


class UserError(ValueError):
    """Bad input: the message names the problem and the fix, on one line."""
