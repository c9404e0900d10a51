"""One exception type for every problem a user can fix.

The CLI prints ``SafetyLayersError`` as a single line (``error: ...``) and exits with
status 2; anything else is a bug and keeps its traceback.
"""


class SafetyLayersError(Exception):
    """A user-facing error: the message names the problem and the fix in one line."""
