"""Checkpoint folders on disk: names, the manifest, completeness, fsync, pruning.

The layout and the atomic-save protocol are described in
:mod:`megatron_lite.checkpoint.engine_state`. This module holds what does not need a DeepSpeed engine: which
folder ``--load`` picks (:func:`find_checkpoint`: ``latest`` if complete, else the newest complete
one), what makes a folder complete (:func:`is_complete`: a manifest whose every file exists with its
recorded size), the manifest and fsync helpers used while saving, and ``--keep-last`` pruning.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import warnings

import torch

import megatron_lite
from megatron_lite.errors import CheckpointSaveError
from megatron_lite.utils import atomic_write_text

MANIFEST = "manifest.json"
ITER_RE = re.compile(r"^iter_(\d{7,})$")


def tag_for(iteration: int) -> str:
    """Folder name of the checkpoint after ``iteration`` steps."""
    return f"iter_{iteration:07d}"


def is_complete(path: str) -> bool:
    """Whether a checkpoint folder has its manifest and every listed file with its size."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return False
    for rel, size in files.items():
        p = os.path.join(path, rel)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            return False
    return True


def find_checkpoint(load_dir: str) -> str | None:
    """Path of the checkpoint to resume from: ``latest`` if complete, else the newest complete one.

    ``load_dir`` may also be a checkpoint folder itself. Returns None when there is none.
    """
    if not load_dir or not os.path.isdir(load_dir):
        return None
    if os.path.isfile(os.path.join(load_dir, MANIFEST)):
        return load_dir if is_complete(load_dir) else None
    latest = os.path.join(load_dir, "latest")
    limit = None
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        cand = os.path.join(load_dir, tag)
        if is_complete(cand):
            return cand
        # Fall back within the lineage `latest` belongs to: later iterations in the folder are
        # from a run that was rolled back past them.
        limit = iter_of(tag) if ITER_RE.match(tag) else None
        warnings.warn(f"{latest} names {tag}, which is incomplete or missing; using the newest "
                      f"complete checkpoint before it instead")
    tags = sorted((d for d in os.listdir(load_dir) if ITER_RE.match(d)
                   and (limit is None or iter_of(d) <= limit)), key=iter_of, reverse=True)
    for tag in tags:
        cand = os.path.join(load_dir, tag)
        if is_complete(cand):
            return cand
    return None


def write_manifest(path: str, checksums: dict[str, str] | None = None,
                   algorithm: str | None = None) -> None:
    """Write ``path/manifest.json`` (atomically): ``{"files": {relative path: size}}`` of every
    file under ``path`` (:func:`list_files`), and with ``checksums`` (``{relative path: hex
    digest}`` of every file, made with ``algorithm``) ``"checksums"`` and
    ``"checksum_algorithm"`` (:mod:`megatron_lite.checkpoint.verify`). A folder is complete once
    it holds its manifest."""
    man: dict = {"files": list_files(path)}
    if checksums is not None:
        man["checksum_algorithm"] = algorithm
        man["checksums"] = {rel: checksums[rel] for rel in sorted(man["files"])}
    atomic_write_text(os.path.join(path, MANIFEST), json.dumps(man, indent=1))


def library_versions() -> dict:
    """Versions of megatron_lite, torch and DeepSpeed (saved in ``run_config.json``)."""
    import deepspeed  # why: heavy optional dependency, imported only when a checkpoint is saved

    return {"megatron_lite": megatron_lite.__version__, "torch": torch.__version__,
            "deepspeed": deepspeed.__version__}


def list_files(path: str) -> dict[str, int]:
    """``{relative path: size in bytes}`` of every file under ``path`` except the manifest."""
    files = {}
    for root, _, names in os.walk(path):
        for n in names:
            if root == path and n == MANIFEST:
                continue
            p = os.path.join(root, n)
            files[os.path.relpath(p, path)] = os.path.getsize(p)
    return files


def check_coverage(seen_by_rank: list[dict[str, int]], mine: dict[str, int], where: str) -> None:
    """Raise unless rank 0's view ``mine`` holds every file any rank sees, with the same size.

    Args:
        seen_by_rank: each rank's :func:`list_files` of the temporary folder after its writes.
        mine: rank 0's listing (what the manifest will record).
        where: the checkpoint folder (for the message).

    Raises:
        CheckpointSaveError: a file written by another rank is missing or differs for rank 0,
            i.e. ``--save`` is not one filesystem shared by all nodes.
    """
    for r, seen in enumerate(seen_by_rank):
        for rel, size in seen.items():
            if mine.get(rel) != size:
                raise CheckpointSaveError(
                    f"{where}: rank {r} sees {rel} ({size} bytes) but rank 0 sees "
                    f"{mine.get(rel)!r} bytes: --save must be a filesystem shared by every node")


def iter_of(tag: str) -> int:
    """The iteration of a folder name ``iter_XXXXXXX``."""
    return int(ITER_RE.match(tag).group(1))


def prune(save_dir: str, keep_last: int | None) -> None:
    """Keep the ``keep_last`` newest checkpoints of the lineage ``latest`` names.

    Only checkpoints at or before the ``latest`` one are candidates, and the ``latest`` one is
    never deleted: after a rollback (``--load DIR/iter_1000 --save DIR``) the abandoned later
    iterations are left alone (with a warning) rather than allowed to push out the new saves.
    """
    if not keep_last:
        return
    tags = [d for d in os.listdir(save_dir) if ITER_RE.match(d)]
    if not tags:
        return
    latest = os.path.join(save_dir, "latest")
    current = max(tags, key=iter_of)
    if os.path.isfile(latest):
        with open(latest) as f:
            named = f.read().strip()
        if ITER_RE.match(named):
            current = named
    later = sorted(t for t in tags if iter_of(t) > iter_of(current))
    if later:
        warnings.warn(f"{save_dir}: {', '.join(later)} are later than the checkpoint just saved "
                      f"({current}) and belong to an abandoned run; --keep-last leaves them alone, "
                      f"delete them by hand if they are not needed")
    older = sorted((t for t in tags if iter_of(t) <= iter_of(current) and t != current),
                   key=iter_of)
    for tag in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)


def read_saved_config(path: str) -> dict:
    """The ``config`` dict saved in a checkpoint folder."""
    with open(os.path.join(path, "run_config.json")) as f:
        return json.load(f)["config"]


def list_checkpoints(save_dir: str) -> list[str]:
    """Complete checkpoint folders in ``save_dir``, oldest first."""
    out = [p for p in glob.glob(os.path.join(save_dir, "iter_*")) if is_complete(p)]
    return sorted(out, key=lambda p: int(ITER_RE.match(os.path.basename(p)).group(1)))


__all__ = ["ITER_RE", "MANIFEST", "check_coverage", "find_checkpoint", "is_complete", "iter_of",
           "library_versions", "list_checkpoints", "list_files", "prune", "read_saved_config",
           "tag_for", "write_manifest"]
