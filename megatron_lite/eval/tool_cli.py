"""How the command-line tools in ``tools/`` end on bad input: one line, exit status 2.

The training entrypoints do this in ``megatron_lite.entrypoints.run_entrypoint``; the
tools follow the same convention through :func:`run_tool`, so a wrong path or flag value prints

    <tool>.py: error: <what is wrong and how to fix it>

The prefix is the script's file name, as argparse prints it for a usage error and the training
entrypoints (``pretrain_llama.py: error:``) and shell scripts (``quickstart.sh: error:``) do: one
style everywhere. Tools that print their own line (warnings, notes) use the same prefix.

on stderr and exits 2 instead of a traceback with status 1. ``MEGATRON_LITE_TRACEBACK=1`` in the
environment re-raises instead (the traceback is then printed as usual).

A tool's ``main(argv)`` keeps raising plain exceptions, so tests and notebooks calling it in
process see them; only the ``if __name__ == "__main__"`` line goes through :func:`run_tool`.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Any, Callable, Sequence

# Raised on purpose with the fix in the message (bad flag values, missing or malformed input
# files, output paths that cannot be written), as in run_entrypoint; anything else is a bug and
# keeps its traceback.
# OSError covers missing or unwritable paths and full or read-only disks (ENOSPC, EROFS).
BAD_INPUT_ERRORS = (ValueError, OSError)


class ToolArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line, like every other bad input of
    the tools: ``<tool>.py: error: unrecognized arguments: --seq-lenght 256 (did you mean
    --seq-length?); see <tool>.py --help`` and exit status 2, where argparse would print its
    whole usage block first.
    """

    def error(self, message: str):  # noqa: D102 - argparse's hook
        hint = ""
        if message.startswith("unrecognized arguments:"):
            words = message.split(":", 1)[1].split()
            flag = next((w.split("=")[0] for w in words if w.startswith("-")), None)
            close = difflib.get_close_matches(flag, list(self._option_string_actions), n=1,
                                              cutoff=0.6) if flag else []
            hint = f" (did you mean {close[0]}?)" if close else ""
        if message.startswith(("unrecognized arguments", "the following arguments are required")):
            hint += f"; see {self.prog} --help"
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


def error_line(tool: str, exc: BaseException) -> str:
    """``"<tool>: error: <message>"`` on one line: the lines of a multi-line message are joined
    with ``; `` (with a space after a line ending in ``:``)."""
    msg = ""
    for part in (p.strip() for p in str(exc).splitlines()):
        if part:
            msg += (" " if msg.endswith(":") else "; " if msg else "") + part
    return f"{tool}: error: {msg or type(exc).__name__}"


def run_tool(tool: str, main: Callable[[Sequence[str] | None], Any],
             argv: Sequence[str] | None = None) -> int:
    """Run a tool's ``main(argv)`` and turn bad-input errors into one line and status 2.

    Args:
        tool: the script's file name for the message (``eval_ppl.py``).
        main: the tool's entry point; an int it returns is the exit status, anything else
            (a result dict, None) means 0.
        argv: arguments without the program name (None: ``sys.argv[1:]``, as argparse does).

    Returns:
        The process exit status: ``main``'s, 0, or 2 after printing :func:`error_line` for one of
        :data:`BAD_INPUT_ERRORS` (``ConfigError`` and ``ConversionError`` are ValueErrors).

    Raises:
        The caught error itself when ``MEGATRON_LITE_TRACEBACK=1``; other exceptions unchanged.
    """
    try:
        status = main(argv)
    except BAD_INPUT_ERRORS as e:
        if os.environ.get("MEGATRON_LITE_TRACEBACK") == "1":
            raise
        print(error_line(tool, e), file=sys.stderr, flush=True)
        return 2
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
