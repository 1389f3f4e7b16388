"""Tests for megatron_lite.training.metrics / timers: the log line, metrics.jsonl, TensorBoard,
MFU arithmetic (exact with a fake clock), run info."""

import json
import math
import os
import subprocess

import pytest
import torch
import yaml

from megatron_lite.training import timers as T
from megatron_lite.config.sections import LoggingConfig
from megatron_lite.training.metrics import TrainingLogger, lookup_peak_tflops, resolve_peak_tflops
from megatron_lite.training.run_info import write_run_info


class FakeClock:
    """Deterministic seconds source; all values are multiples of 1/8 so float sums are exact."""

    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t

    def advance(self, dt):
        self.t += dt


def _run_steps(logger, clock, first_step, n, *, loss=2.0, data=0.125, fwd=0.5, opt=0.375,
               samples_per_step=4, tokens_per_step=1000):
    """Simulate n steps of 1 s each (data 0.125 + fwd/bwd 0.5 + optimizer 0.375)."""
    records = []
    for step in range(first_step, first_step + n):
        with logger.timers.time(T.DATA_WAIT):
            clock.advance(data)
        with logger.timers.time(T.FORWARD_BACKWARD):
            clock.advance(fwd)
        with logger.timers.time(T.OPTIMIZER):
            clock.advance(opt)
        rec = logger.log_step(step, {
            "lr": 1e-3 * step, "loss": loss if not callable(loss) else loss(step),
            "grad_norm": 0.5, "loss_scale": 1.0, "skipped_steps": 0,
            "consumed_samples": step * samples_per_step,
            "consumed_tokens": step * tokens_per_step})
        records.append(rec)
    return records


def _make(tmp_path, clock, lines, rank=0, **cfg):
    config = LoggingConfig(peak_tflops=2.0, **cfg)
    return TrainingLogger(config, rank=rank, world_size=4, flops_per_token=1e9,
                          tokens_per_step=1000, device="cpu", train_iters=10,
                          run_dir=str(tmp_path), clock=clock, print_fn=lines.append)


def test_mfu_arithmetic_and_line(tmp_path):
    clock, lines = FakeClock(), []
    logger = _make(tmp_path, clock, lines, log_interval=2)
    assert lines[0].startswith("[logging] MFU peak per device: --peak-tflops 2.0")
    recs = _run_steps(logger, clock, 1, 4, loss=lambda s: float(s))
    assert recs[0] is None and recs[2] is None
    r = recs[1]
    # 2 steps x 1000 tokens in 2.0 s -> 1000 tok/s; 4 devices -> 250; 1e9 FLOP/token -> 0.25 TFLOP/s
    assert r["tokens_per_sec"] == 1000.0
    assert r["tokens_per_sec_per_device"] == 250.0
    assert r["tflops_per_device"] == 0.25
    assert r["mfu"] == 0.125  # 0.25 / 2.0
    assert r["step_time_s"] == 1.0
    assert (r["data_wait_s"], r["forward_backward_s"], r["optimizer_s"]) == (0.125, 0.5, 0.375)
    assert r["loss"] == 1.5  # mean of the interval's losses 1.0 and 2.0
    assert r["lr"] == 2e-3 and r["consumed_samples"] == 8 and r["consumed_tokens"] == 2000
    line = lines[1]
    for piece in ["iteration        2/      10", "consumed samples:            8",
                  "consumed tokens:           2000",
                  "elapsed time per iteration (ms): 1000.0 (data wait 125.0, fwd+bwd 500.0, "
                  "optimizer 375.0)", "learning rate: 2.000000E-03", "lm loss: 1.500000E+00",
                  "loss scale: 1.0", "grad norm: 0.5000", "skipped iterations:   0",
                  "tokens/s: 1000.0 (per device 250.0)", "TFLOP/s/device: 0.25 |",
                  "MFU: 12.50%", "peak RSS:"]:
        assert piece in line, (piece, line)
    assert len(lines) == 3  # the peak sentence + steps 2 and 4
    logger.close()


def test_jsonl_records_flushed_and_eval(tmp_path):
    clock, lines = FakeClock(), []
    logger = _make(tmp_path, clock, lines, log_interval=1)
    _run_steps(logger, clock, 1, 3)
    logger.log_eval(3, math.log(8.0), tokens=512, extra={"consumed_tokens": 3000})
    # Read while the logger is still open: every record must already be on disk.
    with open(tmp_path / "metrics.jsonl") as f:
        recs = [json.loads(ln) for ln in f]
    assert [r["step"] for r in recs] == [1, 2, 3, 3]
    required = {"step", "consumed_samples", "consumed_tokens", "lr", "loss", "grad_norm",
                "skipped_steps", "tokens_per_sec", "tflops_per_device", "mfu"}
    for r in recs[:3]:
        assert required <= set(r) and r["type"] == "train"
        assert r["tokens_per_sec"] == 1000.0 and r["mfu"] == 0.125
    assert recs[2]["consumed_samples"] == 12 and recs[2]["lr"] == 3e-3
    ev = recs[3]
    assert ev["type"] == "eval" and ev["val_tokens"] == 512 and ev["consumed_tokens"] == 3000
    assert ev["val_loss"] == pytest.approx(math.log(8.0), abs=0) and ev["val_ppl"] == \
        pytest.approx(8.0, rel=1e-15)
    assert "validation loss at iteration 3" in lines[-1] and "lm loss PPL: 8.000000E+00" in \
        lines[-1]
    logger.close()


def test_nan_step_counted_and_json_null(tmp_path):
    clock, lines = FakeClock(), []
    logger = _make(tmp_path, clock, lines, log_interval=3)
    _run_steps(logger, clock, 1, 3, loss=lambda s: float("nan") if s == 2 else 4.0 * s)
    logger.close()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec["loss"] == 8.0  # (4 + 12) / 2: the NaN step is left out of the mean
    assert rec["nan_steps_in_interval"] == 1
    # Tokens of the skipped step still count for throughput: 3000 tokens in 3 s.
    assert rec["tokens_per_sec"] == 1000.0
    _run_steps(logger := _make(tmp_path / "b", clock, lines, log_interval=1), clock, 1, 1,
               loss=float("inf"))
    logger.close()
    rec = json.loads((tmp_path / "b" / "metrics.jsonl").read_text())
    assert rec["loss"] is None  # strict JSON: non-finite -> null


def test_tensorboard_scalars_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    clock, lines = FakeClock(), []
    tb = tmp_path / "tb"
    logger = _make(tmp_path, clock, lines, log_interval=2, tensorboard_dir=str(tb))
    _run_steps(logger, clock, 1, 4, loss=lambda s: float(s))
    logger.log_eval(4, {"val_loss": 0.0, "val_ppl": 1.0, "tokens": 10})  # evaluate()'s dict
    logger.close()
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu",
            "train/tflops_per_device", "train/data_wait_s", "val/val_loss",
            "val/val_ppl"} <= tags
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(2, 1.5), (4, 3.5)]
    assert [(e.step, e.value) for e in acc.Scalars("train/mfu")] == [(2, 0.125), (4, 0.125)]
    assert [(e.step, e.value) for e in acc.Scalars("val/val_ppl")] == [(4, 1.0)]
    assert [(e.step, e.value) for e in acc.Scalars("val/val_tokens")] == [(4, 10.0)]


def test_only_rank0_writes(tmp_path):
    clock, lines = FakeClock(), []
    logger = _make(tmp_path, clock, lines, rank=1, log_interval=1,
                   tensorboard_dir=str(tmp_path / "tb"))
    recs = _run_steps(logger, clock, 1, 2)
    logger.close()
    assert lines == [] and not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "tb").exists()
    assert recs[1]["tokens_per_sec"] == 1000.0  # every rank gets the record back


def test_resume_drops_later_records(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    clock, lines = FakeClock(), []
    tb = str(tmp_path / "tb")
    logger = _make(tmp_path, clock, lines, log_interval=1, tensorboard_dir=tb)
    _run_steps(logger, clock, 1, 5, loss=1.0)
    logger.close()  # "killed" after step 5 in the middle of a line, last checkpoint at step 3
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 6, "loss"')
    logger = TrainingLogger(LoggingConfig(peak_tflops=2.0, log_interval=1, tensorboard_dir=tb),
                            0, 4, 1e9, 1000, run_dir=str(tmp_path), resume_step=3, clock=clock,
                            print_fn=lines.append)
    _run_steps(logger, clock, 4, 2, loss=9.0)
    logger.close()
    recs = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 9.0),
                                                       (5, 9.0)]
    acc = EventAccumulator(tb)
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == \
        [(1, 1.0), (2, 1.0), (3, 1.0), (4, 9.0), (5, 9.0)]


def test_fresh_start_moves_an_old_metrics_file_aside(tmp_path, capsys):
    clock, lines = FakeClock(), []
    logger = _make(tmp_path, clock, lines, log_interval=1)
    _run_steps(logger, clock, 1, 2, loss=1.0)
    logger.close()  # died before its first checkpoint: the relaunch is a fresh start
    logger = _make(tmp_path, clock, lines, log_interval=1)
    _run_steps(logger, clock, 1, 1, loss=5.0)
    logger.close()
    recs = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 5.0)]
    old = [p for p in os.listdir(tmp_path) if p.startswith("metrics.jsonl.") and p.endswith(".old")]
    assert len(old) == 1
    assert [json.loads(ln)["step"] for ln in open(tmp_path / old[0])] == [1, 2]


def test_timing_log_levels(tmp_path):
    clock, lines = FakeClock(), []
    logger = _make(tmp_path, clock, lines, log_interval=1, timing_log_level=0)
    _run_steps(logger, clock, 1, 1)
    assert "elapsed time per iteration (ms): 1000.0 |" in lines[-1]
    assert "data wait" not in lines[-1]
    logger.close()
    logger = _make(tmp_path / "b", clock, lines, log_interval=1, timing_log_level=2)
    with logger.timers.time("grads-all-reduce"):
        clock.advance(0.25)
    rec = _run_steps(logger, clock, 1, 1)[0]
    assert rec["grads_all_reduce_s"] == 0.25
    assert "other timers (ms): grads_all_reduce 250.0" in lines[-1]
    logger.close()


def test_exclude_time_and_step_tokens(tmp_path):
    clock, lines = FakeClock(), []
    logger = _make(tmp_path, clock, lines, log_interval=2)
    _run_steps(logger, clock, 1, 1)
    with logger.exclude_time():  # an evaluation: 5 s that must not lower throughput
        clock.advance(5.0)
    clock.advance(1.0)
    rec = logger.log_step(2, {"lr": 0.1, "loss": 1.0, "consumed_samples": 8,
                              "consumed_tokens": 3000, "step_tokens": 2000})
    assert rec["step_time_s"] == 1.0 and rec["tokens_per_sec"] == 1500.0  # 3000 tok / 2 s
    with pytest.raises(KeyError, match="consumed_tokens"):
        logger.log_step(3, {"lr": 0.1, "loss": 1.0, "consumed_samples": 8})
    logger.close()


def test_timers():
    clock = FakeClock()
    timers = T.Timers("cpu", clock)
    timers("a").start()
    clock.advance(0.5)
    timers("a").stop()
    timers("a").start()
    clock.advance(0.25)
    assert timers("a").elapsed(reset=False) == 0.75  # a running interval counts up to now
    clock.advance(0.25)
    timers("a").stop()
    assert timers.elapsed_all() == {"a": 1.0}
    assert timers.elapsed_all() == {"a": 0.0}
    with pytest.raises(RuntimeError, match="without start"):
        timers("b").stop()
    timers("b").start()
    with pytest.raises(RuntimeError, match="started twice"):
        timers("b").start()


def test_peak_table_and_cpu_assumption():
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4
    assert lookup_peak_tflops("NVIDIA H100 PCIe", torch.bfloat16) == 756.0
    assert lookup_peak_tflops("NVIDIA H200", torch.bfloat16) == 989.4
    assert lookup_peak_tflops("NVIDIA A100-SXM4-80GB", torch.float16) == 312.0
    assert lookup_peak_tflops("Some Unknown GPU", torch.bfloat16) is None
    peak, why = resolve_peak_tflops(LoggingConfig(), torch.device("cpu"), torch.float32)
    assert peak > 0 and why.startswith("ASSUMED CPU peak = measured fp32 torch.mm")
    with pytest.raises(ValueError, match="--log-interval"):
        LoggingConfig(log_interval=0)
    with pytest.raises(ValueError, match="--peak-tflops"):
        LoggingConfig(peak_tflops=-1.0)


def test_peak_per_dtype_and_device(monkeypatch):
    """MFU's peak follows the training precision: the table's column on GPUs (TF32 for fp32 when
    torch allows TF32 matmuls), a matmul measured at that dtype on CPU; the sentence says which."""
    import megatron_lite.training.metrics as M

    h100 = "NVIDIA H100 80GB HBM3"
    tf32 = torch.backends.cuda.matmul.allow_tf32  # a property of torch's cuBLAS module
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert [lookup_peak_tflops(h100, d) for d in (torch.bfloat16, torch.float16, torch.float32)] \
            == [989.4, 989.4, 66.9]
        assert lookup_peak_tflops("AMD Instinct MI300X", torch.float32) == 163.4
        assert lookup_peak_tflops("NVIDIA H20", torch.float32) == 44.0
        torch.backends.cuda.matmul.allow_tf32 = True
        assert lookup_peak_tflops(h100, torch.float32) == 494.7
        assert lookup_peak_tflops("NVIDIA H100 NVL", torch.float32) == 417.5
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    seen = []
    monkeypatch.setattr(M, "measure_cpu_matmul_tflops", lambda dtype: seen.append(dtype) or 0.004)
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        peak, why = resolve_peak_tflops(LoggingConfig(), torch.device("cpu"), dtype)
        assert peak == 0.004 and seen[-1] is dtype
        assert why.startswith(f"ASSUMED CPU peak = measured {name} torch.mm") and "4.0 GFLOP/s" in why
    # The logger prints the assumption once, at start, and uses it for MFU.
    lines = []
    logger = TrainingLogger(LoggingConfig(log_interval=1), 0, 1, 1e9, 1000, "cpu",
                            dtype=torch.bfloat16, print_fn=lines.append)
    assert seen[-1] is torch.bfloat16 and logger.peak_tflops == 0.004
    assert lines == ["[logging] MFU peak per device: " + why.replace("fp32", "bf16")]
    logger.close()
    # A real (small) bf16 measurement is a positive number.
    monkeypatch.undo()
    assert M.measure_cpu_matmul_tflops(torch.bfloat16, n=64, min_seconds=0.01) > 0


def test_write_run_info(tmp_path):
    cfg = {"model": {"hidden_size": 64, "num_layers": 2}, "training": {"lr": 3e-4,
                                                                       "betas": (0.9, 0.95)}}
    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    os.environ["HF_TOKEN"] = "do-not-record"
    try:
        info = write_run_info(str(tmp_path / "run"), cfg)
    finally:
        del os.environ["HF_TOKEN"]
    loaded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert loaded == {"model": {"hidden_size": 64, "num_layers": 2},
                      "training": {"lr": 3e-4, "betas": [0.9, 0.95]}}
    on_disk = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert on_disk == info
    assert on_disk["versions"]["torch"] == torch.__version__
    import deepspeed
    assert on_disk["versions"]["deepspeed"] == deepspeed.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert on_disk["git"]["commit"] == head.stdout.strip()
    assert "OMP_NUM_THREADS" in on_disk["environment"]
    assert "HF_TOKEN" not in on_disk["environment"]
    assert not [p for p in os.listdir(tmp_path / "run") if p.startswith(".tmp")]


def test_metrics_file_flag_overrides_run_dir_and_flags_parse(tmp_path):
    from megatron_lite.config import load_config

    clock, lines = FakeClock(), []
    target = tmp_path / "elsewhere" / "m.jsonl"
    logger = TrainingLogger(LoggingConfig(peak_tflops=2.0, log_interval=1,
                                          metrics_file=str(target)), 0, 4, 1e9, 1000,
                            run_dir=str(tmp_path / "run"), clock=clock, print_fn=lines.append)
    _run_steps(logger, clock, 1, 1)
    logger.close()
    assert json.loads(target.read_text())["step"] == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # No --metrics-file and no run dir: nothing is written, the line is still printed.
    logger = TrainingLogger(LoggingConfig(peak_tflops=2.0, log_interval=1), 0, 4, 1e9, 1000,
                            clock=clock, print_fn=lines.append)
    assert logger.metrics_path is None
    _run_steps(logger, clock, 1, 1)
    assert "iteration        1" in lines[-1]
    # The flags reach the section through the generated parser.
    cfg = load_config(None, ["--hidden-size", "32", "--num-layers", "2",
                             "--num-attention-heads", "4", "--vocab-size", "50",
                             "--seq-length", "16", "--micro-batch-size", "1",
                             "--global-batch-size", "1", "--train-iters", "1",
                             "--log-interval", "5", "--peak-tflops", "12.5",
                             "--timing-log-level", "2", "--tensorboard-dir", "tb",
                             "--metrics-file", "m.jsonl", "--eval-interval", "7",
                             "--eval-iters", "3"])
    assert (cfg.logging.log_interval, cfg.logging.peak_tflops, cfg.logging.timing_log_level,
            cfg.logging.tensorboard_dir, cfg.logging.metrics_file) == (5, 12.5, 2, "tb",
                                                                       "m.jsonl")
    assert (cfg.eval.eval_interval, cfg.eval.eval_iters) == (7, 3)


@pytest.mark.gpu
def test_cuda_peak_memory_and_timers():
    from megatron_lite.training.metrics import peak_memory_bytes

    dev = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(dev)
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device=dev)
    mem, kind = peak_memory_bytes(dev)
    assert kind == "CUDA max allocated" and mem >= 64 * 2**20
    del x
    timers = T.Timers(dev)
    with timers.time("matmul"):
        a = torch.randn(2048, 2048, device=dev)
        a @ a
    assert timers.elapsed_all()["matmul"] > 0  # synchronised: the kernel's time is inside
    peak, why = resolve_peak_tflops(LoggingConfig(), dev, torch.bfloat16)
    name = torch.cuda.get_device_name(dev)
    assert (peak is None) == (lookup_peak_tflops(name, torch.bfloat16) is None)
    assert name in why
