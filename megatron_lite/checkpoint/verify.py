"""Verified checkpoints: file checksums, the check of one folder, and which folder ``--load`` takes.

The manifest (:func:`megatron_lite.checkpoint.layout.write_manifest`) records every file's size
and, since verified checkpoints, its checksum (``"checksums"``) and the algorithm
(``"checksum_algorithm"``). :func:`folder_problem` checks one folder against it;
:func:`choose_checkpoint` (collective) is what ``--load`` uses: the folder ``latest`` names, or,
when that one is incomplete or damaged, the newest valid one before it, with one line saying so;
a ``--load`` folder whose checkpoints are all damaged is an error, never a silent start at step 0.

Checksum choice, measured on this project's 2-core CPU machine: on a 256 MiB buffer in memory
XXH3-128 (the ``xxhash`` package) 14.3 GB/s, sha256 1.51 GB/s, blake2b 0.62 GB/s; over the files
of a 125m checkpoint (2.15 GB in the page cache, ``bench/bench_checkpoint.py``, load ~3)
9.94 / 1.34 / 0.71 GB/s, i.e. 0.22 s / 1.60 s / 3.00 s per checkpoint (under load 25: 0.86 / 0.18
/ 0.10 GB/s). XXH3-128 is the fastest by 5-10x, so it is the default; without the package the
manifest uses hashlib's sha256. The checksum
guards against damage (a flipped bit, a truncated or half-copied file), not against someone
forging a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional

import torch.distributed as dist

from megatron_lite.checkpoint.layout import ITER_RE, MANIFEST, iter_of
from megatron_lite.errors import CheckpointLoadError

try:   # optional: ~10x faster than sha256; requirements.txt installs it
    import xxhash
except ImportError:  # pragma: no cover - depends on the environment
    xxhash = None

CHUNK = 8 << 20   # bytes read per update: large enough to amortise the call, small for the cache


def _hashers() -> dict[str, Callable[[], object]]:
    out = {"sha256": hashlib.sha256, "blake2b": hashlib.blake2b}
    if xxhash is not None:
        out["xxh3_128"] = xxhash.xxh3_128
    return out


HASHERS = _hashers()
ALGORITHM = "xxh3_128" if "xxh3_128" in HASHERS else "sha256"


def file_checksum(path: str, algorithm: str = ALGORITHM) -> str:
    """Hex digest of the file at ``path`` with ``algorithm`` (a key of :data:`HASHERS`).

    Raises:
        OSError: the file cannot be read. KeyError: an unknown algorithm.
    """
    h = HASHERS[algorithm]()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def bytes_checksum(data, algorithm: str = ALGORITHM) -> str:
    """Hex digest of an in-memory buffer (same digest as :func:`file_checksum` of its file)."""
    h = HASHERS[algorithm]()
    h.update(data)
    return h.hexdigest()


def read_manifest(path: str) -> dict:
    """The manifest of checkpoint folder ``path``.

    Raises:
        OSError: no manifest. ValueError: not JSON or no ``files`` table.
    """
    with open(os.path.join(path, MANIFEST)) as f:
        man = json.load(f)
    if not isinstance(man, dict) or not isinstance(man.get("files"), dict):
        raise ValueError(f"{MANIFEST} has no 'files' table")
    return man


def file_problem(path: str, rel: str, size: int, checksum: Optional[str],
                 algorithm: Optional[str]) -> Optional[str]:
    """What is wrong with file ``rel`` of folder ``path`` (None: it is as the manifest says).

    Checks existence, size (a truncated or grown file) and, when ``checksum`` is given, the
    content."""
    p = os.path.join(path, rel)
    if not os.path.isfile(p):
        return f"{rel} is missing"
    actual = os.path.getsize(p)
    if actual != size:
        return (f"{rel} has {actual} bytes, the manifest says {size} "
                f"({'truncated' if actual < size else 'grown'})")
    if checksum is not None:
        try:
            got = file_checksum(p, algorithm)
        except OSError as e:
            return f"{rel} cannot be read ({e})"
        if got != checksum:
            return f"{rel} is damaged ({algorithm} checksum {got}, the manifest says {checksum})"
    return None


def share(files: dict[str, int], rank: int, world: int) -> list[str]:
    """The files rank ``rank`` of ``world`` checks: largest first, each to the rank with the fewest
    bytes so far (every rank computes the same split from the same manifest)."""
    load = [0] * world
    mine = []
    for rel in sorted(files, key=lambda r: (-files[r], r)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += files[rel]
        if r == rank:
            mine.append(rel)
    return mine


def folder_problem(path: str, verify: bool = True, rank: int = 0,
                   world: int = 1) -> tuple[Optional[str], bool]:
    """Check this rank's share of checkpoint folder ``path`` against its manifest.

    Args:
        path: a checkpoint folder (``iter_NNNNNNN``).
        verify: also compare checksums (``--no-verify-checkpoint``: sizes only).
        rank, world: this process's share of the files (:func:`share`); ``0, 1`` checks all.

    Returns:
        ``(problem, verified)``: the first problem found in one line (None when fine), and whether
        the manifest carries checksums (False: a checkpoint saved before verified checkpoints).
    """
    try:
        man = read_manifest(path)
    except OSError:
        return f"{MANIFEST} is missing (the save did not finish)", False
    except ValueError as e:
        return f"{MANIFEST} is unreadable ({e})", False
    sums = man.get("checksums") or {}
    algorithm = man.get("checksum_algorithm")
    if sums and algorithm not in HASHERS:
        return (f"{MANIFEST} uses checksum {algorithm!r}, which this Python cannot compute "
                f"(pip install xxhash, or --no-verify-checkpoint)"), bool(sums)
    for rel in share(man["files"], rank, world):
        problem = file_problem(path, rel, man["files"][rel],
                               sums.get(rel) if verify else None, algorithm)
        if problem is not None:
            return problem, bool(sums)
    return None, bool(sums)


def folder_report(path: str) -> tuple[list[str], dict]:
    """Every problem of checkpoint folder ``path`` (not only the first, for
    ``tools/verify_checkpoint.py``) and its manifest (``{}`` when unreadable)."""
    try:
        man = read_manifest(path)
    except (OSError, ValueError):
        return [folder_problem(path)[0]], {}
    sums, algorithm = man.get("checksums") or {}, man.get("checksum_algorithm")
    if sums and algorithm not in HASHERS:
        return [folder_problem(path)[0]], man
    out = [file_problem(path, rel, size, sums.get(rel), algorithm)
           for rel, size in sorted(man["files"].items())]
    return [p for p in out if p is not None], man


def candidates(load_dir: str) -> list[str]:
    """Folders ``--load load_dir`` may resume from, in the order to try them.

    ``load_dir`` itself when it is a checkpoint folder (has a manifest, or an ``iter_`` name);
    otherwise the folder ``latest`` names, then the older ``iter_`` folders, newest first. Later
    ``iter_`` folders than the one ``latest`` names belong to a run that was rolled back past
    them and are not candidates (as in :func:`~megatron_lite.checkpoint.layout.find_checkpoint`).
    """
    if not load_dir or not os.path.isdir(load_dir):
        return []
    if os.path.isfile(os.path.join(load_dir, MANIFEST)) or \
            ITER_RE.match(os.path.basename(os.path.normpath(load_dir))):
        return [load_dir]
    tags = [d for d in os.listdir(load_dir) if ITER_RE.match(d)
            and os.path.isdir(os.path.join(load_dir, d))]
    limit = None
    latest = os.path.join(load_dir, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            named = f.read().strip()
        if ITER_RE.match(named):
            limit = iter_of(named)
            tags = sorted(set(tags) | {named})
    tags = sorted((t for t in tags if limit is None or iter_of(t) <= limit), key=iter_of,
                  reverse=True)
    return [os.path.join(load_dir, t) for t in tags]


def _agreed_problem(path: str, verify: bool) -> tuple[Optional[str], bool]:
    """:func:`folder_problem` with the files split over the ranks and the verdict shared
    (collective when a process group of several ranks exists): every rank gets the same answer."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return folder_problem(path, verify)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = folder_problem(path, verify, rank, world)
    views: list = [None] * world
    dist.all_gather_object(views, mine)
    problems = sorted(p for p, _ in views if p is not None)
    return (problems[0] if problems else None), all(v for _, v in views)


def choose_checkpoint(load_dir: str, verify: bool = True, fallback: bool = True,
                      say: Callable[[str], None] = print) -> Optional[str]:
    """The checkpoint ``--load load_dir`` resumes from (collective: every rank calls it).

    Tries :func:`candidates` in order; each is checked by :func:`folder_problem`, its files split
    over the ranks and the verdict shared, so all ranks agree on the folder they load. A
    damaged or incomplete candidate is reported with ``say`` (rank 0) in one line naming the file,
    and the previous one is tried (``fallback``).

    Args:
        load_dir: ``--load``. verify: compare checksums (``--no-verify-checkpoint``: sizes only).
        fallback: try older checkpoints when the newest is damaged (``--no-checkpoint-fallback``:
            an error instead). say: where rank 0's lines go.

    Returns:
        The folder, or None when ``load_dir`` holds no checkpoint at all (a first start).

    Raises:
        CheckpointLoadError: the newest checkpoint is damaged and ``fallback`` is off, or every
            checkpoint in ``load_dir`` is damaged or incomplete (never a silent step 0).
    """
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    bad = []
    for path in candidates(load_dir):
        problem, verified = _agreed_problem(path, verify)
        tag = os.path.basename(os.path.normpath(path))
        if problem is None:
            if bad and rank0:
                say(f"[checkpoint] {'; '.join(bad)}: falling back to {tag}")
            if verify and not verified and rank0:
                say(f"[checkpoint] {tag} has no checksums (saved before verified checkpoints): "
                    f"loaded unverified")
            return path
        bad.append(f"{tag} is unusable ({problem})")
        if not fallback:
            raise CheckpointLoadError(
                f"--load {load_dir}: {bad[-1]}; drop --no-checkpoint-fallback to resume from the "
                f"previous checkpoint, or --load an earlier iter_ folder")
    if bad:
        raise CheckpointLoadError(
            f"--load {load_dir}: no usable checkpoint ({'; '.join(bad)}); refusing to start from "
            f"step 0 beside them: restore a checkpoint, or --load/--save an empty folder to start "
            f"afresh")
    return None


__all__ = ["ALGORITHM", "HASHERS", "bytes_checksum", "candidates", "choose_checkpoint",
           "file_checksum", "file_problem", "folder_problem", "folder_report", "read_manifest", "share"]
