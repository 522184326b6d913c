"""User-facing errors: one line that names the problem and the fix.

The CLI prints a `ScratchError` as `error: <message>` and exits with status 2 instead of a
traceback; anything else escaping is a bug in scratchlm, not in the user's input.
"""


class ScratchError(Exception):
    """Bad input from the user (a missing file, a config typo, a foreign checkpoint, ...)."""
