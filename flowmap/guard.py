"""One-line errors for ``scripts/*``: a user mistake or a fault stop ends as ``error: ...`` on stderr, exit code 2.

    if __name__ == "__main__":
        main_guard(main)

User mistakes are ValueErrors (CheckpointError included), OSErrors (bad paths), KeyErrors, argument errors
(argparse through ``ScriptParser``, jsonargparse, Lightning's MisconfigurationException); fault stops are
``NonFiniteLossError`` and ``CorruptShardError``. Anything else is a bug and keeps its traceback, and so does
every error under ``--debug`` or ``FLOWMAP_DEBUG=1``. No Lightning import here (light scripts use it too).
"""

from __future__ import annotations

import argparse
import os
import sys


class ScriptParser(argparse.ArgumentParser):
    """argparse for scripts/*: a usage error raises a ValueError (one line through ``main_guard``) instead of
    printing the usage block; every script takes ``--debug``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug", action="store_true", help="show tracebacks instead of one-line errors (also FLOWMAP_DEBUG=1)"
        )

    def error(self, message: str):
        raise ValueError(f"{self.prog}: {message}")


def _user_error(err: BaseException) -> BaseException:
    """The innermost cause of a chained error (jsonargparse wraps our ValueErrors in its own)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the original error is the last line
        last = text.splitlines()[-1].strip()
        text = last.split(": ", 1)[1] if ": " in last and "." in last.split(": ", 1)[0] else last
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(err).__name__


def _is_user_error(err: BaseException, root: BaseException) -> bool:
    """User mistakes (bad values, paths, files) and the faults a run stops on (non-finite loss, corrupt data)."""
    from flowmap.data.shards import CorruptShardError
    from flowmap.nonfinite import NonFiniteLossError

    faults = (ValueError, OSError, KeyError, NonFiniteLossError, CorruptShardError)
    lightning_config = any(c.__name__ == "MisconfigurationException" for c in type(root).__mro__)
    return (
        isinstance(root, faults)
        or lightning_config
        or type(err).__name__ == "ArgumentError"
        or "jsonargparse" in type(err).__module__
    )


def debug_requested() -> bool:
    """``--debug`` on the command line or ``FLOWMAP_DEBUG`` set (to anything but 0)."""
    return "--debug" in sys.argv[1:] or os.environ.get("FLOWMAP_DEBUG", "0") not in ("", "0")


def main_guard(main) -> None:
    """Run ``main()``; a user error or a fault stop becomes one line on stderr and exit code 2
    (``--debug`` or ``FLOWMAP_DEBUG=1`` shows the traceback instead)."""
    try:
        main()
    except KeyboardInterrupt:
        raise
    except Exception as err:
        root = _user_error(err)
        if not _is_user_error(err, root) or debug_requested():
            raise
        print(f"error: {_one_line(root)}", file=sys.stderr)
        sys.exit(2)
