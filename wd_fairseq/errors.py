"""The error every wd_fairseq tool raises when a run cannot start."""


class WDSetupError(ValueError):
    """A WD run cannot start: the message names the file, the flag and the fix."""
