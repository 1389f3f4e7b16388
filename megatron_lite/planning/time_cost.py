"""Training compute, wall-clock time, GPU-hours, energy and cost (¥) of a run.

Formulas (the recipe's cost chapter, symbols as in its index):

- FLOPs_train ≈ 6 · N_params · T_tokens (Kaplan et al. 2020, section 2.1, C ≈ 6NT: 2 FLOPs per
  parameter per token forward, 4 backward); the exact per-token count of
  ``megatron_lite.model.counting.flops_per_token`` (attention included) is reported beside it and
  is what MFU and the tokens/s derived from ``--mfu`` use.
- tokens/s = MFU · peak FLOP/s per GPU · GPUs / FLOPs per token, unless measured (--tokens-per-sec).
- seconds = T_tokens / tokens/s; GPU-hours = GPUs · seconds / 3600; ¥_gpu = GPU-hours · ¥/GPU·h.
- kWh = GPUs · kW per GPU · hours · PUE; ¥_power = kWh · ¥/kWh; TCO ≈ ¥_gpu + ¥_power + other.
- The recipe's time formula (notes on training time): T = 8·C·P / (GPUs · achieved FLOP/s), the
  factor 8 = 6 + 2 for the extra forward of activation recomputation (6 without recompute).
"""

from __future__ import annotations

import dataclasses

# Device memory (nominal, bytes) and typical training power per GPU incl. its server share (kW),
# keyed by the --gpu name; "name" is matched against the peak-FLOP/s table of
# megatron_lite.training.metrics (one table for MFU and planning, vendors' dense peaks).
GPU_SPECS = {
    "h100": {"name": "H100", "memory_bytes": 80 * 1024 ** 3, "power_kw": 0.7},
    "h800": {"name": "H800", "memory_bytes": 80 * 1024 ** 3, "power_kw": 0.7},
    "h200": {"name": "H200", "memory_bytes": 141 * 10 ** 9, "power_kw": 0.7},
    "h20": {"name": "H20", "memory_bytes": 96 * 1024 ** 3, "power_kw": 0.4},
    "a100": {"name": "A100", "memory_bytes": 80 * 1024 ** 3, "power_kw": 0.4},
    "a100-40gb": {"name": "A100", "memory_bytes": 40 * 1024 ** 3, "power_kw": 0.4},
    "a800": {"name": "A800", "memory_bytes": 80 * 1024 ** 3, "power_kw": 0.4},
    "l40s": {"name": "L40S", "memory_bytes": 48 * 1024 ** 3, "power_kw": 0.35},
    "b200": {"name": "B200", "memory_bytes": 180 * 10 ** 9, "power_kw": 1.0},
}


def peak_flops(gpu: str, precision: str = "bf16") -> float | None:
    """Dense peak FLOP/s of one ``--gpu`` device at ``precision`` (bf16/fp16/fp32), or None.

    Looked up in ``megatron_lite.training.metrics.PEAK_TFLOPS`` (the table MFU logging uses);
    fp32 counts at the TF32 peak, as a GPU run with TF32 matmuls would.

    Raises:
        ValueError: unknown ``--gpu``.
    """
    if gpu not in GPU_SPECS:
        raise ValueError(f"unknown --gpu {gpu!r}; choose one of {', '.join(sorted(GPU_SPECS))} "
                         f"or pass --peak-tflops and --device-memory-gb")
    from megatron_lite.training.metrics import PEAK_TFLOPS

    key = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "tf32")
    for pattern, peaks in PEAK_TFLOPS:
        if pattern.lower() in GPU_SPECS[gpu]["name"].lower():
            value = peaks.get(key)
            return value * 1e12 if value else None
    return None


SECONDS_PER_DAY = 86400.0


def flops_train_6nt(n_params: float, tokens: float) -> float:
    """Training FLOPs by the 6·N·T rule (Kaplan et al. 2020, section 2.1).

    Args:
        n_params: N, parameters (the recipe uses non-embedding N_params).
        tokens: T, training tokens.

    Returns:
        FLOPs (forward + backward, no recompute).
    """
    return 6.0 * n_params * tokens


def tokens_per_second(flops_per_token: float, num_gpus: int, peak_flops: float | None = None,
                      mfu: float | None = None, measured: float | None = None) -> float:
    """Cluster training throughput, tokens/s.

    Either ``measured`` (tokens/s of the whole run, e.g. from a short benchmark) or
    ``mfu · peak_flops · num_gpus / flops_per_token`` (MFU as defined by Chowdhery et al. 2022,
    PaLM, appendix B: achieved model FLOP/s over peak).

    Raises:
        ValueError: neither a measurement nor (mfu, peak) given, or values out of range.
    """
    if measured is not None:
        if measured <= 0:
            raise ValueError(f"--tokens-per-sec must be > 0 (got {measured})")
        return float(measured)
    if mfu is None or peak_flops is None:
        raise ValueError("give --tokens-per-sec, or --mfu with a known --gpu (or --peak-tflops)")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1] (got {mfu})")
    if flops_per_token <= 0 or num_gpus <= 0:
        raise ValueError("flops_per_token and num_gpus must be positive")
    return mfu * peak_flops * num_gpus / flops_per_token


@dataclasses.dataclass(frozen=True)
class CostReport:
    """Time and money of a run.

    Attributes:
        seconds: wall-clock seconds. days: seconds / 86400. gpu_hours: GPUs × hours.
        cost_gpu: ¥ for GPU time. energy_kwh: facility energy incl. PUE. cost_power: ¥ for it.
        cost_other: ¥ for anything else (storage, network, staff). cost_total: TCO, ¥.
    """

    seconds: float
    days: float
    gpu_hours: float
    cost_gpu: float
    energy_kwh: float
    cost_power: float
    cost_other: float
    cost_total: float


def run_cost(tokens: float, tokens_per_sec: float, num_gpus: int, price_gpu_hour: float = 0.0,
             price_kwh: float = 0.0, pue: float = 1.3, gpu_power_kw: float = 0.7,
             cost_other: float = 0.0) -> CostReport:
    """Wall-clock, GPU-hours, energy and ¥ of training ``tokens`` at ``tokens_per_sec``.

    Formulas as in the recipe's index (cost section): seconds = T/(tokens/s);
    GPU-hours = GPUs·seconds/3600; ¥_gpu = GPU-hours·¥/GPU·h; kWh = GPUs·kW·hours·PUE;
    ¥_power = kWh·¥/kWh; TCO = ¥_gpu + ¥_power + other.

    Args:
        tokens: T_tokens.
        tokens_per_sec: cluster throughput.
        num_gpus: devices.
        price_gpu_hour: ¥ per GPU-hour.
        price_kwh: ¥ per kWh.
        pue: power usage effectiveness (facility / IT energy), >= 1.
        gpu_power_kw: average IT power per GPU incl. its share of the server, kW.
        cost_other: other costs, ¥.

    Raises:
        ValueError: non-positive throughput or GPU count, PUE < 1, negative prices.
    """
    if tokens_per_sec <= 0 or num_gpus <= 0 or tokens < 0:
        raise ValueError("tokens/s and GPUs must be positive, tokens non-negative")
    if pue < 1.0:
        raise ValueError(f"--pue must be >= 1 (got {pue})")
    if min(price_gpu_hour, price_kwh, gpu_power_kw, cost_other) < 0:
        raise ValueError("prices, power and other costs must be non-negative")
    seconds = tokens / tokens_per_sec
    hours = seconds / 3600.0
    gpu_hours = num_gpus * hours
    cost_gpu = gpu_hours * price_gpu_hour
    energy = num_gpus * gpu_power_kw * hours * pue
    cost_power = energy * price_kwh
    return CostReport(seconds, seconds / SECONDS_PER_DAY, gpu_hours, cost_gpu, energy, cost_power,
                      cost_other, cost_gpu + cost_power + cost_other)


def recipe_training_seconds(params: float, tokens: float, num_gpus: int,
                            achieved_flops_per_gpu: float, recompute: bool = True) -> float:
    """The recipe's time formula T = 8·C·P / (GPUs · achieved FLOP/s).

    C = tokens, P = parameters; the factor is 8 with activation recomputation (one extra forward,
    2 FLOPs/param/token) and 6 without. The recipe's worked example: LLaMA-65B, P = 6.5e10,
    C = 1.4e12, 2048 A100 at an achieved 2e14 FLOP/s -> 1.78e6 s ≈ 20.6 days.

    Returns:
        Seconds.
    """
    if num_gpus <= 0 or achieved_flops_per_gpu <= 0:
        raise ValueError("num_gpus and achieved FLOP/s must be positive")
    factor = 8.0 if recompute else 6.0
    return factor * tokens * params / (num_gpus * achieved_flops_per_gpu)
