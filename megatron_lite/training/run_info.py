"""Run-folder capture: the resolved config, library versions, git revision and the launch
environment, written atomically next to the checkpoints (``run_info.json``, ``config.yaml``)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any

import torch
import yaml

from megatron_lite.utils import atomic_write_text


def _plain(obj: Any) -> Any:
    """Config values as YAML/JSON-safe plain types (tuples -> lists, dtypes/paths -> str)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


# Environment variables worth recording for reproducibility (launcher, threading, comms, CUDA).
_ENV_PREFIXES = ("CUDA_", "NCCL_", "OMP_", "MKL_", "TORCH_", "PYTORCH_", "MASTER_", "SLURM_",
                 "DS_", "HF_", "TRANSFORMERS_", "MEGATRON_LITE_", "CUBLAS_", "GLOO_")
_ENV_NAMES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
              "PYTHONHASHSEED", "TOKENIZERS_PARALLELISM", "CUDA_VISIBLE_DEVICES")
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")


def _git_revision() -> dict[str, Any]:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": None if status is None else bool(status)}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda}
    for mod in ("deepspeed", "transformers", "numpy", "sentencepiece", "tokenizers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed, or a broken install: record it as absent
            out[mod] = None
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() \
        else None
    out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() \
        else None
    return out


def write_run_info(run_dir: str, config_dict: Any) -> dict[str, Any]:
    """Write the resolved config and the run's environment into ``run_dir`` (call on rank 0).

    Files (each written atomically: temporary file, then os.replace):
      * ``config.yaml`` — the resolved config tree (a dict or a dataclass).
      * ``run_info.json`` — ``config``, ``versions`` (python, torch, CUDA, cuDNN, NCCL,
        deepspeed, transformers, ...), ``git`` (commit, branch, dirty), ``environment``
        (launcher/threading/comms variables; names containing TOKEN/KEY/SECRET/PASSWORD are
        never recorded), ``host`` (hostname, platform, CPUs, torch threads, GPU names),
        ``argv`` and ``time_utc``.

    Returns:
        The run-info dict that was written.
    """
    config = _plain(config_dict)
    env = {k: v for k, v in sorted(os.environ.items())
           if (k.startswith(_ENV_PREFIXES) or k in _ENV_NAMES)
           and not any(w in k.upper() for w in _SECRET_WORDS)}
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    info = {
        "config": config,
        "versions": _versions(),
        "git": _git_revision(),
        "environment": env,
        "host": {"hostname": socket.gethostname(), "platform": platform.platform(),
                 "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "gpus": gpus},
        "argv": list(sys.argv),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_text(os.path.join(run_dir, "config.yaml"), yaml.safe_dump(config, sort_keys=False))
    atomic_write_text(os.path.join(run_dir, "run_info.json"), json.dumps(info, indent=2) + "\n")
    return info
