"""How a console script ends on a user's mistake: ``PROG: error: MESSAGE`` on stderr and
exit status 1, no traceback (the message says what is wrong and the fix)."""

import sys
from typing import Callable, Tuple, Type, TypeVar

from .teacher import WDSetupError

Result = TypeVar("Result")


def run_cli(prog: str, job: Callable[[], Result],
            errors: Tuple[Type[Exception], ...] = (WDSetupError,)) -> Result:
    """``job()``'s result; one of ``errors`` exits with ``prog: error: MESSAGE``."""
    try:
        return job()
    except errors as e:
        sys.exit(f"{prog}: error: {e}")
