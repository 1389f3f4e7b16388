"""Training logging: the Megatron-style console line, TensorBoard scalars, metrics.jsonl, run info.

The training loop calls :meth:`TrainingLogger.log_step` after every optimizer step (skipped steps
included) and :meth:`TrainingLogger.log_eval` after each evaluation. Every ``--log-interval`` steps
rank 0 prints one line and writes the same scalars to TensorBoard and to ``metrics.jsonl``.

Throughput arithmetic (one place, used by the line, TensorBoard and the jsonl record):

* ``tokens_per_sec``            = tokens processed in the interval / wall seconds of the interval
  (skipped steps count: their compute was spent);
* ``tokens_per_sec_per_device`` = tokens_per_sec / world_size;
* ``tflops_per_device``         = flops_per_token * tokens_per_sec_per_device / 1e12, where
  ``flops_per_token`` is the model's training FLOPs (forward + backward) per token from
  ``megatron_lite.model.counting.flops_per_token`` (the caller passes the number);
* ``mfu``                       = tflops_per_device / peak_tflops (a fraction; printed in %), the
  model-FLOPs utilisation of PaLM (Chowdhery et al., 2022, appendix B).

The peak is ``--peak-tflops`` when given, else the dense tensor-core peak of a known GPU at the
training precision (:data:`PEAK_TFLOPS`), else, on CPU, the measured speed of a large matmul at
that precision (the assumption is printed once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import sys
import time
from typing import Any, Callable, Iterator

import torch

from megatron_lite.config.sections import LoggingConfig
from megatron_lite.utils import atomic_write_text
from megatron_lite.parallel import comm_timer
from megatron_lite.training.timers import (BACKWARD, CHECKPOINT, DATA_WAIT, FORWARD,
                                           FORWARD_BACKWARD, OPTIMIZER, Timers)

# The step-time breakdown (seconds per step, written to every train record): disjoint parts
# summing to step_time_s, then checkpoint_s (amortised saves, outside step_time_s).
BREAKDOWN = (("data_wait_s", "data wait"), ("forward_s", "forward"),
             ("backward_s", "backward"), ("tp_comm_s", "TP comm"), ("dp_comm_s", "DP comm"),
             ("optimizer_step_s", "optimizer"), ("other_s", "other"),
             ("checkpoint_s", "checkpoint"))
_BASE_TIMES = ("step_time_s", "data_wait_s", "forward_backward_s", "optimizer_s")
_OWN_TIMERS = (DATA_WAIT, FORWARD_BACKWARD, OPTIMIZER, FORWARD, BACKWARD, CHECKPOINT)


# Dense (no sparsity) peak TFLOP/s per device, from the vendors' data sheets. Keys are matched
# as substrings of torch.cuda.get_device_name(), most specific first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("H800", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H20", {"bf16": 148.0, "fp16": 148.0, "tf32": 74.0, "fp32": 44.0}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.05, "fp16": 362.05, "fp32": 91.6}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("MI300X", {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4}),
]

_DTYPE_KEY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def lookup_peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    """Dense peak TFLOP/s of a known GPU at a precision, or None when not in the table.

    fp32 training counts at the TF32 tensor-core peak when torch allows TF32 matmuls.

    Args:
        device_name: e.g. ``"NVIDIA H100 80GB HBM3"`` (``torch.cuda.get_device_name()``).
        dtype: the training precision (torch.bfloat16, torch.float16, torch.float32).
    """
    key = _DTYPE_KEY.get(dtype, "fp32")
    if key == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        key = "tf32"
    for pattern, peaks in PEAK_TFLOPS:
        if pattern.lower() in device_name.lower():
            return peaks.get(key)
    return None


def measure_cpu_matmul_tflops(dtype: torch.dtype = torch.float32, n: int = 1024,
                              min_seconds: float = 0.3, threads: int | None = None) -> float:
    """Measured TFLOP/s of an n x n x n ``torch.mm`` on this CPU with ``threads`` threads.

    The count is 2 n^3 FLOPs per multiply (one multiply-add = 2 FLOPs). This is the "peak" MFU
    is relative to on CPU, since no data-sheet number applies to a shared virtual CPU. It is
    measured with the threads training uses (default ``torch.get_num_threads()``): a one-thread
    figure would make a multi-thread run's MFU look several times too high.
    """
    if threads is not None and threads != torch.get_num_threads():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return measure_cpu_matmul_tflops(dtype, n, min_seconds)
        finally:
            torch.set_num_threads(before)
    # A private generator: drawing from the global RNG here would shift the dropout stream of a
    # resumed run (the logger is built after the checkpoint's RNG state is restored).
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up (thread pool, packing buffers)
    reps, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return 2.0 * n ** 3 * reps / elapsed / 1e12


def resolve_peak_tflops(config: LoggingConfig, device: torch.device,
                        dtype: torch.dtype) -> tuple[float | None, str]:
    """The peak TFLOP/s per device used for MFU and a sentence saying where it came from.

    Returns:
        (peak or None when unknown, explanation printed at start).
    """
    if config.peak_tflops is not None:
        return float(config.peak_tflops), f"--peak-tflops {config.peak_tflops}"
    dname = _DTYPE_KEY.get(dtype, str(dtype))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = lookup_peak_tflops(name, dtype)
        if peak is None:
            return None, (f"device '{name}' at {dname} is not in the peak table; MFU not "
                          "reported (pass --peak-tflops)")
        return peak, f"table value for '{name}' at {dname} (dense)"
    if device.type == "cpu":
        peak = measure_cpu_matmul_tflops(dtype)
        return peak, (f"ASSUMED CPU peak = measured {dname} torch.mm 1024^3 speed "
                      f"{peak * 1e3:.1f} GFLOP/s with {torch.get_num_threads()} threads "
                      "(pass --peak-tflops to override)")
    return None, f"no peak known for device type '{device.type}'; pass --peak-tflops"


def mfu_label(config: LoggingConfig, device: torch.device, peak: float | None) -> str | None:
    """What MFU is relative to, for the first train line: ``"vs measured matmul peak 0.0421
    TFLOP/s (2 threads)"`` on CPU, ``"vs data-sheet peak 989.4 TFLOP/s"`` on a GPU,
    ``"vs --peak-tflops 2 TFLOP/s"``; None when no peak is known (MFU n/a)."""
    if peak is None:
        return None
    if config.peak_tflops is not None:
        return f"vs --peak-tflops {peak:g} TFLOP/s"
    if device.type == "cpu":
        return f"vs measured matmul peak {peak:.4g} TFLOP/s ({torch.get_num_threads()} threads)"
    return f"vs data-sheet peak {peak:g} TFLOP/s"


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Peak memory of this process: CUDA max allocated on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "CUDA max allocated"
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "peak RSS"


def step_breakdown(times: dict[str, float], comm: dict[str, dict[str, float]], elapsed: float,
                   steps: int) -> dict[str, float]:
    """The disjoint parts of the mean step time (seconds per step), keys of :data:`BREAKDOWN`.

    ``forward_s`` / ``backward_s`` / ``optimizer_step_s`` are the phases' wall time less the
    collectives inside them; ``tp_comm_s`` / ``dp_comm_s`` are all TP collectives and all DP
    ones (DeepSpeed's ZeRO reduce/gather, the loss and token-count all-reduces) of the steps
    (evaluation and saves left out); ``other_s`` is the rest of the step time (batch moves,
    callbacks, logging).

    Args:
        times: seconds per timer name over the interval (``Timers.elapsed_all``).
        comm: collective seconds per timer name and kind (``Timers.comm_all``), and under the
            name ``""`` those of the whole interval.
        elapsed: wall seconds of the interval's steps (evaluation and saves excluded).
        steps: steps in the interval.
    """
    def comm_in(name: str, kind: str | None = None) -> float:
        c = comm.get(name, {})
        return c.get(kind, 0.0) if kind else sum(c.values())

    tp, dp = comm_in("", comm_timer.TP), comm_in("", comm_timer.DP)
    parts = {"data_wait_s": times.get(DATA_WAIT, 0.0),
             "forward_s": times.get(FORWARD, 0.0) - comm_in(FORWARD),
             "backward_s": times.get(BACKWARD, 0.0) - comm_in(BACKWARD),
             "tp_comm_s": tp, "dp_comm_s": dp,
             "optimizer_step_s": times.get(OPTIMIZER, 0.0) - comm_in(OPTIMIZER)}
    parts["other_s"] = max(0.0, elapsed - sum(parts.values()))
    parts["checkpoint_s"] = times.get(CHECKPOINT, 0.0)
    return {k: v / steps for k, v in parts.items()}


def _finite_or_none(x: Any) -> Any:
    # JSON has no NaN/Infinity; strict readers (jq, JavaScript) reject them, so write null.
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _as_float(x: Any) -> float | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.item()
    return float(x)


class TrainingLogger:
    """Console line, TensorBoard and metrics.jsonl for the training loop (writes on rank 0 only).

    The loop times phases with ``logger.timers`` (names :data:`DATA_WAIT`,
    :data:`FORWARD_BACKWARD`, :data:`OPTIMIZER` from ``megatron_lite.training.timers``), calls
    :meth:`log_step` after every step on every rank (no collectives are issued), and wraps work
    that must not count as training time (evaluation, checkpointing) in :meth:`exclude_time`.

    Args:
        config: the ``logging`` section.
        rank: global rank; only rank 0 prints and writes.
        world_size: number of devices (processes) sharing the work, for per-device figures.
        flops_per_token: training FLOPs (forward + backward) per token of the whole model.
        tokens_per_step: tokens in one global batch (GB_tok), counted for throughput per step.
        device: the compute device (``cuda`` timers synchronise; peak memory source).
        dtype: training precision, selects the peak TFLOP/s.
        train_iters: total steps, shown as ``step/total`` when given.
        run_dir: folder for ``metrics.jsonl`` when ``--metrics-file`` is unset (the ``--save``
            folder); no jsonl is written when both are unset.
        resume_step: when resuming from this step, records of later steps left by the killed run
            (and a line cut short by the kill) are dropped from an existing metrics file, and
            TensorBoard purges its later events, so both read as one continuous run.
        clock: seconds source (tests inject a fake one).
        print_fn: where lines go (``print`` with flush).
    """

    def __init__(self, config: LoggingConfig, rank: int, world_size: int, flops_per_token: float,
                 tokens_per_step: int, device: torch.device | str = "cpu", *,
                 dtype: torch.dtype = torch.float32, train_iters: int | None = None,
                 run_dir: str | None = None, resume_step: int | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 print_fn: Callable[[str], None] | None = None):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1 (got {world_size})")
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.flops_per_token = float(flops_per_token)
        self.tokens_per_step = int(tokens_per_step)
        self.device = torch.device(device)
        self.train_iters = train_iters
        self.clock = clock
        self.timers = Timers(self.device, clock)
        # Level 2: exact collective times on CUDA (sync around each; NCCL runs asynchronously).
        comm_timer.set_synchronize(config.timing_log_level >= 2)
        self._print = print_fn or (lambda s: print(s, flush=True))
        self.is_writer = rank == 0
        self.peak_tflops: float | None = None
        self.peak_source = ""
        self._writer = None
        self._jsonl = None
        # Over the whole run, for the closing summary: logged tokens and their training seconds
        # (evaluation and saves excluded, as in each line), last and best (step, val_loss).
        self.run_tokens, self.run_seconds = 0, 0.0
        self.last_val: tuple[int, float] | None = None
        self.best_val: tuple[int, float] | None = None
        self.metrics_path = config.metrics_file or (
            os.path.join(run_dir, "metrics.jsonl") if run_dir else None)
        if self.is_writer:
            self.peak_tflops, self.peak_source = resolve_peak_tflops(config, self.device, dtype)
            self._print(f"[logging] MFU peak per device: {self.peak_source}")
            if config.tensorboard_dir:
                from torch.utils.tensorboard import SummaryWriter  # why: optional, heavy
                # purge_step hides the killed run's events after the resumed step in TensorBoard.
                self._writer = SummaryWriter(
                    log_dir=config.tensorboard_dir,
                    purge_step=None if resume_step is None else resume_step + 1)
            if self.metrics_path:
                self._open_jsonl(resume_step)
        # Said once, in the first train line, so the MFU figure is read against its peak.
        self.mfu_label = mfu_label(config, self.device, self.peak_tflops)
        self._reset_interval()

    # ---- interval bookkeeping -------------------------------------------------------------
    def _reset_interval(self) -> None:
        self._interval_start = self.clock()
        self._excluded = 0.0
        self._comm_start = comm_timer.totals()
        self._comm_excluded = dict.fromkeys(self._comm_start, 0.0)
        self._steps = 0
        self._tokens = 0
        self._loss_sum = 0.0
        self._loss_count = 0
        self._nan_steps = 0

    def start_interval(self) -> None:
        """Restart the interval clock (call right before the first step, after setup)."""
        self._reset_interval()
        self.timers.elapsed_all(reset=True)

    @contextlib.contextmanager
    def exclude_time(self) -> Iterator[None]:
        """Time spent inside this block is not counted as training time (eval, checkpoints)."""
        start, comm = self.clock(), comm_timer.totals()
        try:
            yield
        finally:
            self._excluded += self.clock() - start
            for kind, total in comm_timer.totals().items():
                self._comm_excluded[kind] += total - comm[kind]

    # ---- files ----------------------------------------------------------------------------
    def _open_jsonl(self, resume_step: int | None) -> None:
        path = self.metrics_path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is not None and os.path.exists(path):
            kept = []
            with open(path) as f:
                for ln in f:
                    try:
                        rec = json.loads(ln)
                    except ValueError:  # a line cut short by the kill
                        continue
                    if rec.get("step", 0) <= resume_step:
                        kept.append(ln if ln.endswith("\n") else ln + "\n")
            atomic_write_text(path, "".join(kept))
        elif resume_step is None and os.path.exists(path) and os.path.getsize(path) > 0:
            # A fresh start over an old file (an attempt that died before its first save, or
            # another run): keep the old records beside it rather than mixing two runs' steps.
            old = f"{path}.{time.strftime('%Y%m%d-%H%M%S')}.old"
            os.replace(path, old)
            print(f"[logging] {path} existed at a fresh start; moved it to {old}", flush=True)
        self._jsonl = open(path, "a", buffering=1)

    def log_event(self, record: dict[str, Any], tb_prefix: str) -> None:
        """Write a record of another kind (``record["type"]``, ``record["step"]``; e.g. an online
        mixing update) to metrics.jsonl and TensorBoard under ``tb_prefix/`` (the writer rank only)."""
        if self.is_writer:
            self._write(record, tb_prefix)

    def _write(self, record: dict[str, Any], tb_prefix: str) -> None:
        if self._jsonl is not None:
            clean = {k: _finite_or_none(v) for k, v in record.items()}
            # One line per record, flushed, so a killed run keeps every line written so far.
            self._jsonl.write(json.dumps(clean) + "\n")
            self._jsonl.flush()
        if self._writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key in ("step", "type") or not isinstance(value, (int, float)) \
                        or isinstance(value, bool) or value is None:
                    continue
                self._writer.add_scalar(f"{tb_prefix}/{key}", value, global_step=step)
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer and the metrics file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    # ---- the per-step call ----------------------------------------------------------------
    def log_step(self, step: int, scalars: dict[str, Any]) -> dict[str, Any] | None:
        """Account one finished step; on logging steps print the line and write the record.

        Args:
            step: 1-based number of the step just finished (after a resume, the global step).
            scalars: values of this step. Required: ``lr``, ``loss`` (token-mean loss of the
                global batch; NaN/inf for a skipped step), ``consumed_samples`` and
                ``consumed_tokens`` (totals after this step). Optional: ``grad_norm``,
                ``loss_scale``, ``skipped_steps`` (total so far), ``step_tokens`` (tokens of
                this step when it differs from ``tokens_per_step``, e.g. batch ramp-up); any
                other numeric entries are passed through to TensorBoard and the jsonl record.

        Returns:
            The record written on logging steps (on every rank), else None.

        Raises:
            KeyError: when a required scalar is missing.
        """
        self._account_step(scalars)
        if step % self.config.log_interval != 0:
            return None

        elapsed = self.clock() - self._interval_start - self._excluded
        comm = self.timers.comm_all(reset=True)
        comm[""] = {k: v - self._comm_start[k] - self._comm_excluded[k]   # the whole interval
                    for k, v in comm_timer.totals().items()}
        times = self.timers.elapsed_all(reset=True)
        steps = self._steps
        self.run_tokens += self._tokens
        self.run_seconds += elapsed
        tokens_per_sec = self._tokens / elapsed if elapsed > 0 else float("nan")
        per_device = tokens_per_sec / self.world_size
        tflops = self.flops_per_token * per_device / 1e12
        mfu = tflops / self.peak_tflops if self.peak_tflops else None
        mem, mem_kind = peak_memory_bytes(self.device)
        record: dict[str, Any] = {
            "type": "train",
            "step": int(step),
            "consumed_samples": int(scalars["consumed_samples"]),
            "consumed_tokens": int(scalars["consumed_tokens"]),
            "lr": _as_float(scalars["lr"]),
            # Mean over the interval's steps with a finite loss (Megatron's averaging).
            "loss": self._loss_sum / self._loss_count if self._loss_count else float("nan"),
            "grad_norm": _as_float(scalars.get("grad_norm")),
            "loss_scale": _as_float(scalars.get("loss_scale")),
            "skipped_steps": int(scalars.get("skipped_steps", 0)),
            "nan_steps_in_interval": self._nan_steps,
            "tokens_per_sec": tokens_per_sec,
            "tokens_per_sec_per_device": per_device,
            "tflops_per_device": tflops,
            "mfu": mfu,
            "step_time_s": elapsed / steps,
            "data_wait_s": times.get(DATA_WAIT, 0.0) / steps,
            "forward_backward_s": times.get(FORWARD_BACKWARD, 0.0) / steps,
            "optimizer_s": times.get(OPTIMIZER, 0.0) / steps,
            "peak_memory_bytes": mem,
            **step_breakdown(times, comm, elapsed, steps),
        }
        if self.config.timing_log_level >= 2:
            for name, sec in times.items():
                if name not in _OWN_TIMERS:
                    record[f"{name.replace('-', '_')}_s"] = sec / steps
        for key, value in scalars.items():
            if key not in record and key != "step_tokens" and isinstance(value, (int, float)):
                record[key] = value
        if self.is_writer:
            self._print(self.format_line(record, mem_kind))
            self._write(record, "train")
        self._reset_interval()
        return record

    def _account_step(self, scalars: dict[str, Any]) -> None:
        """Add one step to the interval's counters (tokens, finite-loss mean, NaN steps).

        Raises:
            KeyError: when a required scalar of :meth:`log_step` is missing.
        """
        missing = [k for k in ("lr", "loss", "consumed_samples", "consumed_tokens")
                   if k not in scalars]
        if missing:
            raise KeyError(f"TrainingLogger.log_step: scalars lack {missing}")
        loss = _as_float(scalars["loss"])
        self._steps += 1
        self._tokens += int(scalars.get("step_tokens", self.tokens_per_step))
        if math.isfinite(loss):
            self._loss_sum += loss
            self._loss_count += 1
        else:
            self._nan_steps += 1

    def format_line(self, r: dict[str, Any], mem_kind: str = "peak memory") -> str:
        """The Megatron-style console line for a train record."""
        total = f"/{self.train_iters:8d}" if self.train_iters else ""
        parts = [f" iteration {r['step']:8d}{total}",
                 f"consumed samples: {r['consumed_samples']:12d}",
                 f"consumed tokens: {r['consumed_tokens']:14d}"]
        timing = f"elapsed time per iteration (ms): {r['step_time_s'] * 1e3:.1f}"
        if self.config.timing_log_level >= 1:
            timing += (f" (data wait {r['data_wait_s'] * 1e3:.1f}, fwd+bwd "
                       f"{r['forward_backward_s'] * 1e3:.1f}, optimizer "
                       f"{r['optimizer_s'] * 1e3:.1f})")
        parts.append(timing)
        if self.config.timing_log_level >= 2 and "other_s" in r:
            parts.append("breakdown (ms): " + ", ".join(
                f"{label} {r[key] * 1e3:.1f}" for key, label in BREAKDOWN))
        if self.config.timing_log_level >= 2:
            own = {*_BASE_TIMES, *(key for key, _ in BREAKDOWN)}
            extra = [f"{k[:-2]} {v * 1e3:.1f}" for k, v in r.items() if k.endswith("_s") and
                     k not in own]
            if extra:
                parts.append("other timers (ms): " + ", ".join(extra))
        parts.append(f"learning rate: {r['lr']:.6E}")
        parts.append(f"lm loss: {r['loss']:.6E}")
        if r["loss_scale"] is not None:
            parts.append(f"loss scale: {r['loss_scale']:.1f}")
        if r["grad_norm"] is not None:
            parts.append(f"grad norm: {r['grad_norm']:.4f}")
        parts.append(f"skipped iterations: {r['skipped_steps']:3d}")
        parts.append(f"nan iterations: {r['nan_steps_in_interval']:3d}")
        parts.append(f"tokens/s: {r['tokens_per_sec']:.1f} (per device "
                     f"{r['tokens_per_sec_per_device']:.1f})")
        # 4 significant digits: CPU runs sit at 1e-3 TFLOP/s, GPUs at hundreds.
        parts.append(f"TFLOP/s/device: {r['tflops_per_device']:.4g}")
        parts.append("MFU: n/a" if r["mfu"] is None else f"MFU: {r['mfu'] * 100:.2f}%"
                     + (f" ({self.mfu_label})" if self.mfu_label else ""))
        self.mfu_label = None
        parts.append(f"{mem_kind}: {r['peak_memory_bytes'] / 2**20:.1f} MiB")
        return " | ".join(parts) + " |"

    def run_throughput(self) -> tuple[float | None, float | None]:
        """``(mean tokens/s, mean MFU)`` over the run's logged intervals (training time only, as
        in each line; MFU None without a peak, both None before the first logged step)."""
        if self.run_seconds <= 0:
            return None, None
        tps = self.run_tokens / self.run_seconds
        tflops = self.flops_per_token * tps / self.world_size / 1e12
        return tps, (tflops / self.peak_tflops if self.peak_tflops else None)

    # ---- evaluation -----------------------------------------------------------------------
    def log_eval(self, step: int, val_loss: float | dict[str, Any], tokens: int | None = None,
                 extra: dict[str, Any] | None = None, split: str = "valid",
                 per_corpus: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """Print, and write to TensorBoard and metrics.jsonl, an evaluation result.

        Args:
            step: training step after which the evaluation ran.
            val_loss: token-mean loss (nats per token), or the dict returned by
                ``megatron_lite.training.evaluation`` (its ``val_loss`` and ``tokens`` are used).
            tokens: number of loss tokens evaluated.
            extra: more numeric entries for the record (e.g. consumed_tokens).
            split: ``"valid"`` (periodic validation: record type ``eval``, keys ``val_loss``,
                ``val_ppl``, ``val_tokens``, TensorBoard ``val/``) or ``"test"`` (the test split
                at the end of training: type ``test``, keys ``test_loss``, ``test_ppl``,
                ``test_tokens``, TensorBoard ``test/``).
            per_corpus: ``{name: evaluate() result}`` of each corpus of a blend; adds
                ``<p>_loss/<name>``, ``<p>_ppl/<name>``, ``<p>_tokens/<name>`` to the record (and
                TensorBoard) and one console line per corpus below the blend's.

        Returns:
            The record, with ``<p>_loss`` and ``<p>_ppl`` = exp(loss), ``p`` = val or test.

        Raises:
            ValueError: unknown ``split``.
        """
        if split not in ("valid", "test"):
            raise ValueError(f"log_eval: split must be 'valid' or 'test' (got {split!r})")
        if isinstance(val_loss, dict):
            tokens = val_loss.get("tokens", tokens)
            val_loss = val_loss["val_loss"]
        val_loss = float(val_loss)
        try:
            ppl = math.exp(val_loss)
        except OverflowError:
            ppl = float("inf")
        p = "val" if split == "valid" else "test"
        if split == "valid" and math.isfinite(val_loss):
            self.last_val = (int(step), val_loss)
            if self.best_val is None or val_loss < self.best_val[1]:
                self.best_val = self.last_val
        record = {"type": "eval" if split == "valid" else "test", "step": int(step),
                  f"{p}_loss": val_loss, f"{p}_ppl": ppl}
        if tokens is not None:
            record[f"{p}_tokens"] = int(tokens)
        lines = ""
        for name, res in (per_corpus or {}).items():
            c_loss, c_ppl, c_tokens = float(res["val_loss"]), float(res["val_ppl"]), res.get("tokens")
            record.update({f"{p}_loss/{name}": c_loss, f"{p}_ppl/{name}": c_ppl})
            if c_tokens is not None:
                record[f"{p}_tokens/{name}"] = int(c_tokens)
            lines += (f"\n   corpus {name} | lm loss value: {c_loss:.6E} | lm loss PPL: "
                      f"{c_ppl:.6E} | tokens: {c_tokens} |")
        record.update(extra or {})
        if self.is_writer:
            bar = "-" * 100
            what = (f"validation loss at iteration {step}" if split == "valid" else
                    f"test loss at the end of training (iteration {step}), test split")
            self._print(f"{bar}\n {what} | lm loss value: {val_loss:.6E} | lm loss PPL: "
                        f"{ppl:.6E} | tokens: {tokens} |{lines}\n{bar}")
            self._write(record, p)
        return record
