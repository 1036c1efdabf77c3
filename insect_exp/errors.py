"""How errors leave this package: their first line, a form that survives pickling, a CLI's exit.

Standard library only: every command imports it, before TensorFlow or MLflow.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
from collections.abc import Callable
from typing import NoReturn


def first_line(err: BaseException, limit: int | None = 300) -> str:
    """The first line of an error's message (at most `limit` characters), else its type's name.

    TensorFlow's errors keep their plain message in `message` (their str adds the op's context).
    """
    text = str(getattr(err, "message", "") or err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def portable(
    err: BaseException, stand_in: Callable[[str], BaseException] = RuntimeError
) -> BaseException:
    """`err` itself if it survives pickling, else `stand_in("<type>: <message>")` caused by it.

    Errors go between processes pickled (a sweep's job results, the logging process's replies);
    one that cannot make the trip (many library errors take extra constructor arguments) would
    abort the whole exchange.
    """
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        replacement = stand_in(f"{type(err).__name__}: {err}")
        replacement.__cause__ = err  # in-process, the original traceback still prints
        return replacement


def exit_with(program: str, message: str, code: int, at_once: bool = False) -> NoReturn:
    """Print `<program>: <message>` on stderr and exit with `code`.

    Args:
        at_once: skip the interpreter's shutdown (os._exit), after flushing the logs and streams.
    """
    print(f"{program}: {message}", file=sys.stderr)
    if at_once:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
