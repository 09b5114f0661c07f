"""One exception type for every problem the user can fix (a missing optional dependency among them).

The CLI prints its message on one line and exits with code 2; anything else is a bug (exit 1).
"""


class LorafuseError(Exception):
    """A bad input or an impossible request, with a message that says what to do."""


class InputError(LorafuseError):
    """Bad content in the inputs, found while merging (NaN results, a truncated file): unlike an
    interruption, the same run cannot be resumed into success, so what it wrote is removed."""


class OutputComplete(KeyboardInterrupt):
    """Ctrl-C after OUT (the argument) was moved into place: the merge is complete there, unlike after any
    other interruption."""


def require_torch(feature: str, extra: str = "torch") -> None:
    """Stop with one line naming the install when `feature` needs PyTorch and it is not installed: torch
    is an extra (`lorafuse[torch]`), since a plain merge does without it. Looks for it without importing it."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise LorafuseError(f"{feature} needs PyTorch: pip install 'lorafuse[{extra}]'")
