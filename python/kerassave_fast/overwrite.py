"""Stock's `overwrite=False` question, for every format and flavour: asked with the flavour's own
prompt; when no answer can come, refused with `OverwriteRefused` rather than a bare `EOFError`."""

from __future__ import annotations

import contextlib
import errno
import os
import sys


class OverwriteRefused(FileExistsError, EOFError):
    """`overwrite=False`, the file exists, and no answer came to the question whether to replace it.

    Also an `EOFError`: what stock's prompt raises (from `input()`) when nobody can answer it.
    """


def refusal(filepath) -> OverwriteRefused:
    return OverwriteRefused(
        errno.EEXIST,
        "the file exists, overwrite=False, and no answer came to the prompt asking whether to replace it "
        "(pass overwrite=True to replace it)",
        os.fspath(filepath) if isinstance(filepath, str | os.PathLike) else str(filepath),
    )


def _raised_by_prompt(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "ask_to_proceed_with_overwrite"


@contextlib.contextmanager
def prompt_refusals(filepath):
    """Stock's overwrite prompt, left without an answer (`EOFError` from `input()`), raises
    `OverwriteRefused` instead: still an `EOFError`, and a `FileExistsError` naming the file."""
    try:
        yield
    except EOFError as e:
        if isinstance(e, OverwriteRefused) or not _raised_by_prompt(e):
            raise
        raise refusal(filepath) from e


def ask_to_replace(filepath, flavour: str) -> bool:
    """Stock's question whether to replace `filepath` (the flavour's own `io_utils` prompt)."""
    if sys.stdin is None:
        raise refusal(filepath)
    if flavour == "tf_keras":
        from tf_keras.src.utils import io_utils
    else:
        from keras.src.utils import io_utils
    with prompt_refusals(filepath):
        return io_utils.ask_to_proceed_with_overwrite(filepath)
