"""The shared body of the training entrypoints (``pretrain_llama.py``, ``cpt_llama.py``).

Exit status (what a cluster script or an auto-resubmitting scheduler can act on):

* 0 - trained to the end, or stopped cleanly (``--exit-interval``, SIGTERM/SIGUSR1 after saving),
  or ``--dry-run`` printed the plan;
* 2 - bad input: a configuration error (one line naming the flag or YAML key and the fix), or
  one found when the run starts: a missing or corrupt dataset file, a checkpoint that does not
  match the run (model shape, schedule, D at ZeRO >= 1), token ids outside the vocabulary. These
  are ``ValueError``/``FileNotFoundError`` raised on purpose with the fix in the message, printed
  as one line; ``MEGATRON_LITE_TRACEBACK=1`` re-raises them with the traceback;
* 1 - training aborted: too many consecutive skipped steps, or a checkpoint save failed (the
  previous checkpoint is intact and still ``latest``, so a restart resumes from it), or another
  rank's process or node went away (one line naming the lost ranks and their host:
  :mod:`megatron_lite.parallel.peers`), or the stall watchdog found no progress
  (``--stall-timeout-seconds``; stacks in ``<save>/hang/``).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, Optional

import torch

from megatron_lite.config import ConfigError, format_plan
from megatron_lite.config.checks import check_input_paths
from megatron_lite.errors import CheckpointSaveError, TooManySkippedSteps
from megatron_lite.parallel import comm_timer
from megatron_lite.parallel.peers import lost_peer_message
from megatron_lite.planning.run_config import memory_verdict
from megatron_lite.planning.time_cost import GPU_SPECS
from megatron_lite.testing import faults


def _print_dry_run(name: str, cfg, gpu, dry_run_note) -> int:
    """``--dry-run``: the plan, the caller's note and the closing line on rank 0; exit status.

    A plan that cannot be made (the vocabulary size unknown: no ``--vocab-size`` and no
    ``--tokenizer-model``) is one error line with status 2, as the same run without
    ``--dry-run`` reports it.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    try:
        text = format_plan(cfg)
    except ValueError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    print(text)
    if dry_run_note is not None:
        print(dry_run_note(cfg))
    print(dry_run_closing_line(cfg, gpu))
    return 0


def run_entrypoint(name: str, resolve: Callable[[], object], train: Callable[..., object],
                   dry_run_note: Optional[Callable[[object], str]] = None) -> int:
    """Resolve the config, then print the plan (``--dry-run``) or train; errors -> one line.

    Args:
        name: the script's name for messages (``pretrain_llama.py``).
        resolve: returns the finalized RunConfig; raises ``ConfigError`` on bad input.
        train: ``train(cfg, callbacks=...)`` runs training (collective over all ranks). This is
            the one injection point of the tests' fault hooks: ``callbacks`` are
            :func:`megatron_lite.testing.faults.callbacks_from_env` (none unless a
            ``MEGATRON_LITE_*`` test variable is set).
        dry_run_note: extra text printed after the plan under ``--dry-run``.

    Returns:
        The process exit status (see the module docstring).
    """
    install_warning_format(int(os.environ.get("RANK", "0")))
    if "DS_ACCELERATOR" not in os.environ:
        if not torch.cuda.is_available():
            # DeepSpeed's auto-detection ends on the CPU anyway but warns on every rank that it
            # "was unable to detect" a GPU, which reads like a fault on a CPU run.
            os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        cfg = resolve()
        # every input file, before a process group, DeepSpeed or the data loaders
        check_input_paths(cfg)
        gpu = dry_run_gpu(cfg.dry_run_gpu) if cfg.dry_run else None
    except ConfigError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    if cfg.dry_run:
        return _print_dry_run(name, cfg, gpu, dry_run_note)
    try:
        train(cfg, callbacks=faults.callbacks_from_env())
    except ConfigError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except TooManySkippedSteps as e:
        print(f"{name}: training aborted: {e}", file=sys.stderr)
        return 1
    except CheckpointSaveError as e:
        print(f"{name}: checkpoint save failed: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        # a peer's process or node went away: one line naming it instead of this rank's traceback
        lost = lost_peer_message(e, comm_timer.last_collective()["name"])
        if lost is None or os.environ.get("MEGATRON_LITE_TRACEBACK") == "1":
            raise
        print(f"{name}: error: rank {os.environ.get('RANK', '0')}: {lost}", file=sys.stderr,
              flush=True)
        return 1
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("MEGATRON_LITE_TRACEBACK") == "1":
            raise
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    return 0


def dry_run_gpu(given: str | None) -> tuple[str, float | None]:
    """``(planner device name, memory in GiB or None)`` for the dry run's memory estimate:
    ``--gpu`` when given, else the CUDA device present (its name matched to the planner's table,
    its memory measured), else ``"cpu"`` (host RAM).

    Raises:
        ConfigError: ``--gpu`` is not a device the planner knows.
    """
    known = sorted(GPU_SPECS) + ["cpu"]
    if given is not None:
        if given not in known:
            raise ConfigError(f"--gpu {given}: unknown device; choose one of {', '.join(known)}")
        return given, None
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(0).lower()
    # longest key first: "h200" before "h20"
    match = next((k for k in sorted(GPU_SPECS, key=len, reverse=True) if k in name), "h100")
    return match, torch.cuda.get_device_properties(0).total_memory / 2 ** 30


def dry_run_closing_line(cfg, gpu: tuple[str, float | None]) -> str:
    """The dry run's last line: nothing was launched, and the planner's per-device memory
    estimate with its FITS verdict (``tools/plan_run.py --gpu GPU`` prints the full plan)."""
    try:
        verdict = memory_verdict(cfg, gpu[0], gpu[1])
    except ValueError as e:
        return f"dry run: nothing was launched (no memory estimate: {e})"
    return (f"dry run: nothing was launched; {verdict} (tools/plan_run.py --gpu {gpu[0]} with "
            "the same flags prints the full plan)")


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
WARNING_PREFIX = "[megatron_lite] warning: "


def is_project_file(filename: str) -> bool:
    """Whether a warning's source file is megatron_lite's own (the package, the entrypoint
    scripts beside it, ``tools/``), not a third-party library's."""
    path = os.path.abspath(filename)
    root = os.path.dirname(PACKAGE_DIR)
    return path.startswith(PACKAGE_DIR + os.sep) or \
        os.path.dirname(path) in (root, os.path.join(root, "tools"))


def install_warning_format(rank: int) -> None:
    """Print megatron_lite's own ``UserWarning``s as one line, ``[megatron_lite] warning: ...``,
    like the rest of the log, on rank 0 only (every rank reaches the same condition; one line is
    enough), instead of Python's two lines ``file:line: UserWarning: ...`` plus a source line.
    Other warnings (third-party libraries, deprecations) keep Python's format and content.
    Python's default filter still shows a given warning once per location.

    Args:
        rank: this process's global rank (``$RANK``).
    """
    default = warnings.showwarning
    if getattr(default, "megatron_lite", False):
        default = default.default   # installed already (a second entrypoint call in-process)

    def show(message, category, filename, lineno, file=None, line=None):
        if not (issubclass(category, UserWarning) and is_project_file(filename)):
            default(message, category, filename, lineno, file, line)
        elif rank == 0:
            print(WARNING_PREFIX + " ".join(str(message).split()), file=file or sys.stderr,
                  flush=True)

    show.megatron_lite, show.default = True, default
    warnings.showwarning = show
