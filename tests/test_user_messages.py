"""What a user reads (issue 15 #1, #6, #7, #9, #10): MFU's peak named in the first train line,
one-line warnings, the checkpoint-save and end-of-training lines, choices in ``--help``, input
paths checked at parse time."""

from __future__ import annotations

import subprocess

import pytest
import torch

import megatron_lite.training.metrics as M
from megatron_lite.config.sections import LoggingConfig
from megatron_lite.training.metrics import TrainingLogger
from tests.test_first_use import BASE_PYTHON, ROOT, _fresh_shell_env, needs_bare_python


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _steps(logger, clock, n):
    out = []
    for step in range(1, n + 1):
        logger.start_interval() if step == 1 else None
        clock.t += 1.0
        out.append(logger.log_step(step, {"loss": 1.0, "lr": 1e-3, "grad_norm": 0.5,
                                          "loss_scale": None, "consumed_samples": step,
                                          "consumed_tokens": step * 1000, "skipped_steps": 0}))
    return out


def test_cpu_mfu_peak_is_measured_with_the_training_threads_and_named_once(monkeypatch):
    """#9: the CPU peak is a matmul measured with torch.get_num_threads() threads, and the first
    train line says what MFU is relative to (later lines do not repeat it)."""
    seen = []

    def fake(dtype):
        seen.append(torch.get_num_threads())
        return 0.004
    monkeypatch.setattr(M, "measure_cpu_matmul_tflops", fake)
    clock, lines = _Clock(), []
    logger = TrainingLogger(LoggingConfig(log_interval=1), 0, 1, 1e9, 1000, "cpu",
                            train_iters=3, clock=clock, print_fn=lines.append)
    assert seen == [torch.get_num_threads()]
    _steps(logger, clock, 2)
    logger.close()
    n = torch.get_num_threads()
    assert f"(vs measured matmul peak 0.004 TFLOP/s ({n} threads))" in lines[1], lines[1]
    assert "vs measured" not in lines[2] and "MFU: " in lines[2]


def test_measure_cpu_matmul_uses_the_thread_count_given():
    before = torch.get_num_threads()
    calls = []
    real_mm = torch.mm

    def mm(a, b):
        calls.append(torch.get_num_threads())
        return real_mm(a, b)
    torch.mm = mm
    try:
        assert M.measure_cpu_matmul_tflops(n=32, min_seconds=0.001, threads=1) > 0
    finally:
        torch.mm = real_mm
    assert set(calls) == {1} and torch.get_num_threads() == before


# ---- #2: the training entrypoints and the Lightning runner in a fresh shell -------------------
@pytest.mark.parametrize("cmd", [["pretrain_llama.py", "--help"], ["cpt_llama.py", "--help"],
                                 ["-m", "megatron_lite.integrations.lightning", "--help"]])
@needs_bare_python
def test_entrypoints_started_without_venv_rerun_under_it(cmd):
    r = subprocess.run([BASE_PYTHON, *cmd], capture_output=True, text=True, cwd=ROOT,
                       env=_fresh_shell_env(), timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith("usage: "), r.stdout[:200]


# ---- #10: choice flags list their allowed values in --help -----------------------------------
def test_help_lists_the_choices_of_choice_flags():
    from megatron_lite.config.cli import build_parser

    text = build_parser().format_help()
    for flag, values in (("--attention-backend", "auto,flash,sdpa,flex,eager"),
                         ("--tokenizer-type", "SentencePieceTokenizer,HuggingFaceTokenizer"),
                         ("--rope-scaling-type", "none,linear,ntk,dynamic,yarn,llama3"),
                         ("--lr-decay-style", "cosine,linear,constant,inverse-square-root,wsd")):
        assert f"{flag} {{{values}}}" in text, flag
