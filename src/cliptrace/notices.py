"""The warning class of what cliptrace tells its user on its own: a cache recomputed, a damaged checkpoint passed
over, leftovers of a killed run removed. The command line prints each as one ``warning: ...`` line."""

from __future__ import annotations


class CliptraceWarning(UserWarning):
    """Something cliptrace did on its own that its user should know; the message starts with the file concerned."""
