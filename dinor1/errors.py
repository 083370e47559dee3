"""User-facing errors.

A `UserError` is bad input the user can fix (a config key, a file, a sample). The CLI prints its
message as one line and exits non-zero; the traceback is shown only with `--debug`.
"""


class UserError(Exception):
    """Bad input that names what is wrong (the key, file or sample) and how to fix it."""
