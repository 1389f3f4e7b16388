"""Figures of one or several runs (matplotlib, no display needed).

Each ``plot_*`` function takes a list of :class:`~megatron_lite.analysis.run_data.RunData` and
returns a ``matplotlib.figure.Figure`` built without ``pyplot`` (no global state, no GUI
backend). Every curve is a ``Line2D`` labelled ``"<run> <series>"`` whose data are the
metrics.jsonl values as logged (x = step, or consumed tokens for the log-log figure); with
``smooth > 0`` the labelled line is the EMA (:func:`run_data.ema`) and the raw values stay
behind it, faint and unlabelled. Runs are overlaid in colours ``C0, C1, ...`` with a legend.

Figures (file names as written by :func:`write_figures`):

=================  ===========================================================================
loss               train loss and validation loss per step; spike steps (from ``spikes/``
                   and the ``spikes`` counter) as red triangles, skipped steps as black crosses
loss_loglog        train and validation loss against consumed tokens, both axes logarithmic
                   (a healthy run is close to a straight line: a power law)
perplexity         exp(train loss), validation and per-corpus perplexity (``val_ppl/<name>``)
lr                 learning rate
grad_norm          pre-clip global grad norm with the ``--clip-grad`` threshold (dashed)
throughput         tokens/s (all devices)
mfu                model-FLOPs utilisation in %
step_time          per run: the step-time breakdown stacked (data wait, forward, backward, TP
                   and DP communication, optimizer step, other, checkpoint; older runs: their
                   ``*_s`` timing fields), with the measured step time as a black line
batch_size         global batch size in samples (the ramp-up)
=================  ===========================================================================
"""

from __future__ import annotations

import io
import math
import os
from typing import Callable

from matplotlib.figure import Figure

from megatron_lite.analysis.run_data import RunData, ema, series, skipped_steps, spike_steps
from megatron_lite.training.metrics import BREAKDOWN
from megatron_lite.utils import atomic_write_bytes

TOTAL_TIME_FIELD = "step_time_s"


def _ax(title: str, ylabel: str, xlabel: str = "step", size=(8, 4.5)):
    fig = Figure(figsize=size, dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _curve(ax, xs: list, ys: list, label: str, color: str, smooth: float, **kw) -> None:
    """The raw series (labelled, or faint behind its EMA when smoothing)."""
    if not xs:
        return
    if smooth > 0:
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, ema(ys, smooth), color=color, label=label, **kw)
    else:
        ax.plot(xs, ys, color=color, label=label, **kw)


def _finish(fig, ax) -> Figure:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _loss_at(run: RunData, step: int) -> float | None:
    for r in run.train:
        if r["step"] >= step:
            for key in ("step_loss", "loss"):
                v = r.get(key)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    return v
            return None
    return None


def plot_loss(runs: list[RunData], smooth: float = 0.0) -> Figure:
    """Train and validation loss per step, spikes and skipped steps marked."""
    fig, ax = _ax("loss", "loss (nats/token)")
    for i, run in enumerate(runs):
        c = f"C{i}"
        _curve(ax, *series(run.train, "loss"), f"{run.name} train", c, smooth)
        xs, ys = series(run.evals, "val_loss")
        if xs:
            ax.plot(xs, ys, color=c, marker="o", linestyle="--", label=f"{run.name} validation")
        marks = [(s, _loss_at(run, s)) for s in spike_steps(run)]
        marks = [(s, v) for s, v in marks if v is not None]
        if marks:
            ax.plot(*zip(*marks), linestyle="none", marker="^", color="red", markersize=9,
                    label=f"{run.name} spikes")
        skips = skipped_steps(run)
        if skips:
            lo = min(series(run.train, "loss")[1] or [0.0])
            ax.plot(skips, [lo] * len(skips), linestyle="none", marker="x", color="black",
                    label=f"{run.name} skipped steps")
    return _finish(fig, ax)


def plot_loss_loglog(runs: list[RunData], smooth: float = 0.0) -> Figure:
    """Train and validation loss against consumed tokens on log-log axes."""
    fig, ax = _ax("loss vs tokens (log-log)", "loss (nats/token)", "consumed tokens")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for i, run in enumerate(runs):
        c = f"C{i}"
        _curve(ax, *series(run.train, "loss", x="consumed_tokens"), f"{run.name} train", c,
               smooth)
        xs, ys = series(run.evals, "val_loss", x="consumed_tokens")
        if not xs:  # eval records without consumed_tokens: take them from the train records
            tok = {r["step"]: r.get("consumed_tokens") for r in run.train}
            pts = [(tok.get(s), v) for s, v in zip(*series(run.evals, "val_loss"))
                   if tok.get(s)]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if xs:
            ax.plot(xs, ys, color=c, marker="o", linestyle="--", label=f"{run.name} validation")
    return _finish(fig, ax)


def _exp(values: list) -> list:
    return [math.exp(min(v, 700.0)) for v in values]


def plot_perplexity(runs: list[RunData], smooth: float = 0.0) -> Figure:
    """exp(train loss), validation perplexity and per-corpus validation perplexity."""
    fig, ax = _ax("perplexity", "perplexity")
    ax.set_yscale("log")
    for i, run in enumerate(runs):
        c = f"C{i}"
        xs, ys = series(run.train, "loss")
        if xs:
            ax.plot(xs, _exp(ema(ys, smooth) if smooth > 0 else ys), color=c,
                    label=f"{run.name} train")
        xs, ys = series(run.evals, "val_ppl")
        if xs:
            ax.plot(xs, ys, color=c, marker="o", linestyle="--", label=f"{run.name} validation")
        for j, name in enumerate(run.corpora()):
            xs, ys = series(run.evals, f"val_ppl/{name}")
            if xs:
                ax.plot(xs, ys, color=c, marker="os^vD<>"[j % 7], linestyle=":",
                        label=f"{run.name} validation {name}")
    return _finish(fig, ax)


def _simple(key: str, title: str, ylabel: str, scale: float = 1.0,
            smoothable: bool = True) -> Callable[..., Figure]:
    def plot(runs: list[RunData], smooth: float = 0.0) -> Figure:
        fig, ax = _ax(title, ylabel)
        for i, run in enumerate(runs):
            xs, ys = series(run.train, key)
            _curve(ax, xs, [y * scale for y in ys], f"{run.name} {key}", f"C{i}",
                   smooth if smoothable else 0.0)
        return _finish(fig, ax)
    plot.__doc__ = f"``{key}`` per logged step (x{scale:g})."
    return plot


plot_lr = _simple("lr", "learning rate", "learning rate", smoothable=False)
plot_throughput = _simple("tokens_per_sec", "throughput", "tokens/s (all devices)")
plot_mfu = _simple("mfu", "model FLOPs utilisation", "MFU (%)", scale=100.0)
plot_batch_size = _simple("global_batch_size", "global batch size (ramp-up)", "samples per step",
                          smoothable=False)


def plot_grad_norm(runs: list[RunData], smooth: float = 0.0) -> Figure:
    """Pre-clip global grad norm, with each run's ``--clip-grad`` as a dashed line."""
    fig, ax = _ax("gradient norm (before clipping)", "global L2 norm")
    for i, run in enumerate(runs):
        _curve(ax, *series(run.train, "grad_norm"), f"{run.name} grad_norm", f"C{i}", smooth)
        clip = run.cfg("optimizer", "clip_grad")
        if clip:
            ax.axhline(clip, color=f"C{i}", linestyle="--", linewidth=1,
                       label=f"{run.name} --clip-grad {clip:g}")
    return _finish(fig, ax)


def step_time_parts(run: RunData) -> dict[str, tuple[list, list]]:
    """The parts of the step time to stack, each as ``(steps, seconds per step)``.

    Runs that log the disjoint breakdown (``other_s`` present: ``training.metrics.BREAKDOWN``,
    data wait, forward, backward, TP comm, DP comm, optimizer step, other, summing to
    ``step_time_s``, then the amortised ``checkpoint_s``) stack exactly those fields: the coarse
    ``forward_backward_s`` / ``optimizer_s`` and the ``--timing-log-level 2`` timers overlap them.
    Older runs stack every numeric ``*_s`` field besides ``step_time_s``, in the order logged.
    """
    keys: list[str] = []
    for r in run.train:
        for k, v in r.items():
            if k.endswith("_s") and k != TOTAL_TIME_FIELD and k not in keys and \
                    isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    if "other_s" in keys:
        keys = [k for k, _ in BREAKDOWN if k in keys]
    steps = [r["step"] for r in run.train]
    return {k: (steps, [float(r.get(k) or 0.0) for r in run.train]) for k in keys}


def plot_step_time(runs: list[RunData], smooth: float = 0.0) -> Figure:
    """Per run (one panel each): the timing fields stacked, the measured step time on top."""
    fig = Figure(figsize=(9.5, 3.6 * len(runs) + 0.6), dpi=100)
    for i, run in enumerate(runs):
        ax = fig.add_subplot(len(runs), 1, i + 1)
        ax.set_title(f"{run.name}: step time breakdown")
        ax.set_xlabel("step")
        ax.set_ylabel("seconds per step")
        ax.grid(True, alpha=0.3)
        parts = step_time_parts(run)
        if parts:
            steps = next(iter(parts.values()))[0]
            ax.stackplot(steps, *[v for _, v in parts.values()],
                         labels=[dict(BREAKDOWN).get(k, k[:-2]) for k in parts], alpha=0.8)
        xs, ys = series(run.train, TOTAL_TIME_FIELD)
        if xs:
            ax.plot(xs, ys, color="black", label=f"{run.name} step_time")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


FIGURES: dict[str, Callable[..., Figure]] = {
    "loss": plot_loss, "loss_loglog": plot_loss_loglog, "perplexity": plot_perplexity,
    "lr": plot_lr, "grad_norm": plot_grad_norm, "throughput": plot_throughput, "mfu": plot_mfu,
    "step_time": plot_step_time, "batch_size": plot_batch_size,
}


def build_figures(runs: list[RunData], smooth: float = 0.0) -> dict[str, Figure]:
    """Every figure of :data:`FIGURES` for the runs (a figure whose series no run logged, e.g.
    MFU without a known peak, is still drawn, empty)."""
    if not runs:
        raise ValueError("no run to plot")
    ema([], smooth)  # validates smooth once
    return {name: make(runs, smooth) for name, make in FIGURES.items()}


def write_figures(figures: dict[str, Figure], out_dir: str, fmt: str = "png") -> list[str]:
    """Write each figure to ``out_dir/<name>.<fmt>`` (atomically; the files follow the umask).

    Raises:
        ValueError: ``fmt`` is not png or svg.
    """
    if fmt not in ("png", "svg"):
        raise ValueError(f"--format must be png or svg (got {fmt!r})")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt)
        path = os.path.join(out_dir, f"{name}.{fmt}")
        atomic_write_bytes(path, buf.getvalue(), fsync=False)
        paths.append(path)
    return paths


__all__ = ["FIGURES", "build_figures", "plot_batch_size", "plot_grad_norm", "plot_loss",
           "plot_loss_loglog", "plot_lr", "plot_mfu", "plot_perplexity", "plot_step_time",
           "plot_throughput", "step_time_parts", "write_figures"]
