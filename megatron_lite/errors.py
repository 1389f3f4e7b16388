"""The exception types the library raises on purpose (a leaf module: it imports nothing).

Which exit status each one means at the entrypoints is documented in
:mod:`megatron_lite.entrypoints`: the ``ValueError`` kinds are bad input (exit 2, one line), the
``RuntimeError`` kinds abort a run that started well (exit 1).
"""


class ConfigError(ValueError):
    """A bad flag, YAML key or value, or an inconsistent combination; the message says the fix."""


class RunLockedError(ValueError):
    """Another live run holds the ``--save`` folder's lock (a ValueError: exit status 2)."""


class CheckpointSaveError(RuntimeError):
    """A save failed (full disk, file-size limit, I/O error, files invisible to rank 0).

    Nothing was marked complete: ``latest`` still names the previous checkpoint. Training stops
    (the Trainer does not catch it; ``pretrain_llama.py``/``cpt_llama.py`` print it as one line
    and exit 1), because every later save would most likely fail the same way and the steps
    trained meanwhile would be lost on the next fault anyway.
    """


class CheckpointLoadError(ValueError):
    """``--load`` found checkpoints but none it may resume from (a damaged or truncated file,
    a missing manifest), or the newest is damaged and ``--no-checkpoint-fallback`` is set; the
    message names the folder and the file (a ValueError: exit status 2, one line)."""


class TooManySkippedSteps(RuntimeError):
    """Raised on every rank when ``--max-skipped-steps`` consecutive steps were skipped."""


__all__ = ["CheckpointLoadError", "CheckpointSaveError", "ConfigError", "RunLockedError",
           "TooManySkippedSteps"]
