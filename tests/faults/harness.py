"""Launch helpers of the fault-injection suite: the tiny corpus, torchrun launches of the real
entrypoint (``pretrain_llama.py``), worker discovery, metrics / sample-id / parameter readers.

Every launch is ``python -m torch.distributed.run --nproc_per_node 2 pretrain_llama.py ...`` on
CPU (gloo, fp32, ZeRO-1, D = 2, A = 2), so a fault hits the code path a user runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_ITERS = 8

# Same model/batch for every launch: only --save/--load/--save-interval and the faults differ, so
# every run's step k trains on the same samples and (CPU, same world) gives the same loss bits.
BASE = ["--model-size", "tiny", "--seq-length", "64", "--micro-batch-size", "1",
        "--global-batch-size", "4", "--train-iters", str(TRAIN_ITERS), "--lr", "3e-3",
        "--min-lr", "3e-4", "--lr-warmup-iters", "2", "--split", "100,0,0", "--num-workers", "0",
        "--log-interval", "1", "--eval-interval", "0", "--seed", "7", "--device", "cpu",
        "--zero-stage", "1", "--tokenizer-type", "SentencePieceTokenizer",
        "--peak-tflops", "1"]  # a given peak skips the logger's CPU matmul benchmark


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_corpus(root: str) -> tuple[str, str]:
    """Tokenizer + ``<root>/corpus_text_document.bin/.idx`` from tests/fixtures_data.py's corpus
    through tools/preprocess_data.py. Returns (data prefix, tokenizer model)."""
    from tests.fixtures_data import load_tool, make_tiny_corpus_and_tokenizer

    jsonl, model = make_tiny_corpus_and_tokenizer(os.path.join(root, "tok"))
    rc = load_tool("preprocess_data").main([
        "--input", jsonl, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
        "--output-prefix", os.path.join(root, "corpus"), "--append-eod", "--no-progress"])
    assert rc == 0
    return os.path.join(root, "corpus_text_document"), model


def run_argv(root: str, name: str, ck: str, save_interval: int, data: str, tok: str) -> list[str]:
    """Flags of one run: the same command line serves its first start and every restart."""
    return BASE + ["--data-path", data, "--tokenizer-model", tok,
                   "--data-cache-path", os.path.join(root, "index_cache"),
                   "--save", ck, "--load", ck, "--save-interval", str(save_interval),
                   "--metrics-file", os.path.join(root, name + ".jsonl")]


def env_for(root: str, name: str, **extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1",
               MEGATRON_LITE_LOG_SAMPLES=os.path.join(root, name + ".samples"))
    for k in ("MEGATRON_LITE_INJECT_NAN", "MEGATRON_LITE_INJECT_RAISE",
              "MEGATRON_LITE_INJECT_SAVE_KILL", "MEGATRON_LITE_DUMP_PARAMS"):
        env.pop(k, None)
    env.update(extra)
    return env


def launch(argv: list[str], env: dict, log_path: str, torchrun_args: tuple = (),
           preexec_fn=None, script: str = "pretrain_llama.py") -> subprocess.Popen:
    """Start ``torchrun --nproc_per_node 2 <script> argv`` with stdout+stderr to ``log_path``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), *torchrun_args, os.path.join(ROOT, script), *argv]
    log = open(log_path, "w")
    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                         preexec_fn=preexec_fn)
    log.close()
    LAUNCHED.append(p)
    return p


LAUNCHED: list[subprocess.Popen] = []


def kill_leftovers() -> None:
    """Kill every launch (and its workers) still running, e.g. after a failed wait."""
    for p in LAUNCHED:
        if p.poll() is None:
            kill_tree(p.pid)
            p.wait()
    LAUNCHED.clear()


def finish(p: subprocess.Popen, log_path: str, timeout: float = 300) -> tuple[int, str]:
    """Wait for a launch (killing its whole tree on timeout); returns (exit code, log text).

    Raises:
        AssertionError: the launch did not end within ``timeout`` seconds (a hang).
    """
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        p.wait()
        raise AssertionError(f"launch hung for {timeout} s: " + read(log_path)[-3000:])
    return rc, read(log_path)


def kill_tree(pid: int) -> None:
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return
    for pr in procs:
        try:
            pr.kill()
        except psutil.NoSuchProcess:
            pass


def workers(p: subprocess.Popen, n: int = 2, timeout: float = 120) -> dict[int, int]:
    """``{rank: pid}`` of the launch's worker processes (children of the torchrun agent)."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        out = {}
        try:
            for c in psutil.Process(p.pid).children():
                env = c.environ()
                if "RANK" in env:
                    out[int(env["RANK"])] = c.pid
        except psutil.Error:
            pass
        if len(out) == n:
            return out
        time.sleep(0.05)
    raise AssertionError("worker processes not found")


def wait_steps(path: str, n: int, p: subprocess.Popen, timeout: float = 240,
               poll: float = 0.02) -> None:
    """Wait until ``path`` (metrics.jsonl) has ``n`` training records."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if p.poll() is not None:
            raise AssertionError(f"launch exited ({p.returncode}) before logging {n} steps")
        if len(read_metrics(path)) >= n:
            return
        time.sleep(poll)
    raise AssertionError(f"{path}: fewer than {n} steps after {timeout} s")


def read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def read_metrics(path: str) -> dict[int, dict]:
    """``{step: record}`` of a metrics.jsonl (training records only; a later record of a step,
    e.g. from a resumed run appending, replaces an earlier one)."""
    out: dict[int, dict] = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if r.get("type", "train") == "train" and "step" in r:
                out[r["step"]] = r
    return out


def read_samples(prefix: str) -> dict[tuple[int, int], list[int]]:
    """``{(step, rank): sample ids}`` from the MEGATRON_LITE_LOG_SAMPLES files (last write wins)."""
    out = {}
    for rank in (0, 1):
        path = f"{prefix}.rank{rank}"
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        r = json.loads(line)
                        out[(r["step"], r["rank"])] = r["sample_ids"]
    return out


def send(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced (appended when absent), e.g. ``--num-workers 2``."""
    out = list(argv)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


def tree_pids(pid: int) -> list[int]:
    """``pid`` and every descendant (torchrun agent, ranks, their DataLoader workers)."""
    import psutil

    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def wait_gone(pids, timeout: float = 60) -> list[int]:
    """Wait until none of ``pids`` runs (zombies count as gone); returns those still running."""
    import psutil

    deadline = time.time() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)
