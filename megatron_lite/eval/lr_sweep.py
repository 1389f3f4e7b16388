"""Learning-rate sweep: a grid of short runs and the heatmap of their final validation loss.

The recipe tunes the peak learning rate on short runs of the target model before the long run:
a grid over ``--lr`` and one other knob (global batch in tokens or sequences, or the warmup
length), each cell one ``pretrain_llama.py`` run that only differs in those flags, and a heatmap
of the final validation loss with the best cell marked and diverged runs shown as such.

This module holds the pieces (grid expansion, command lines, reading each cell's metrics.jsonl,
the table, the figure); ``tools/lr_sweep.py`` is the command line. It reads and writes files and
starts processes; it imports no torch (matplotlib only inside :func:`draw_heatmap`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import subprocess
import sys
from typing import Iterable, Sequence

from megatron_lite.utils import atomic_write_bytes, atomic_write_text

# Grid axes: name -> pretrain_llama.py flag. The first axis given is the heatmap's x axis.
AXES = {
    "lr": "--lr",
    "global_batch_tokens": "--global-batch-tokens",
    "global_batch_size": "--global-batch-size",
    "lr_warmup_iters": "--lr-warmup-iters",
    "lr_warmup_tokens": "--lr-warmup-tokens",
    "lr_warmup_fraction": "--lr-warmup-fraction",
}
# Flags the sweep sets itself in every cell's command line.
RESERVED = ("--metrics-file", "--save", "--load", "--tensorboard-dir")
# Flags of which a run takes one: a grid over one refuses the others among the base flags.
EXCLUSIVE = (("global_batch_tokens", "global_batch_size"),
             ("lr_warmup_iters", "lr_warmup_tokens", "lr_warmup_fraction"))
OK, DIVERGED, FAILED, MISSING = "ok", "diverged", "failed", "missing"
CSV_COLUMNS = ("cell", "final_val_loss", "final_val_step", "first_train_loss", "status", "best",
               "metrics_file")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid: ``values`` maps axis name -> the flag's value (as typed)."""

    values: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        """Folder name of the cell, e.g. ``lr3e-4_global_batch_tokens8192``."""
        return "_".join(f"{k}{v}" for k, v in self.values)

    def flags(self) -> list[str]:
        """The cell's flags for ``pretrain_llama.py``."""
        return [x for k, v in self.values for x in (AXES[k], v)]


def parse_values(text: str, axis: str) -> list[str]:
    """``"1e-4,3e-4"`` -> ``["1e-4", "3e-4"]`` (numbers checked, spelling kept for names).

    Raises:
        ValueError: an empty list, a value that is not a positive number (an integer for the
            batch and warmup-length axes; 0 allowed for warmup), or a repeated value.
    """
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals:
        raise ValueError(f"{AXES[axis]} {text!r}: give comma-separated values, e.g. 1e-4,3e-4")
    integer = axis in ("global_batch_tokens", "global_batch_size", "lr_warmup_iters", "lr_warmup_tokens")
    for v in vals:
        try:
            x = int(v) if integer else float(v)
        except ValueError:
            raise ValueError(f"{AXES[axis]} {v!r}: expected {'an integer' if integer else 'a number'}") \
                from None
        low_ok = x >= 0 if axis.startswith("lr_warmup") else x > 0
        if not low_ok or (isinstance(x, float) and not math.isfinite(x)):
            raise ValueError(f"{AXES[axis]} {v!r}: must be {'>= 0' if axis.startswith('lr_warmup') else '> 0'}")
    if len(set(vals)) != len(vals):
        raise ValueError(f"{AXES[axis]} {text!r}: a value is repeated")
    return vals


def expand_grid(axes: dict[str, Sequence[str]]) -> list[Cell]:
    """Every combination of the axes' values, the first axis varying slowest.

    Args:
        axes: axis name (a key of :data:`AXES`) -> its values, in the order given; one or two axes.

    Raises:
        ValueError: no axis, more than two (a heatmap has two), or an unknown axis name.
    """
    if not axes:
        raise ValueError("give at least one grid axis, e.g. --lr 1e-4,3e-4,1e-3")
    if len(axes) > 2:
        raise ValueError(f"a heatmap has two axes; got {len(axes)}: {', '.join(AXES[a] for a in axes)}")
    unknown = [a for a in axes if a not in AXES]
    if unknown:
        raise ValueError(f"unknown grid axis {unknown[0]!r}; known: {', '.join(AXES)}")
    for group in EXCLUSIVE:
        both = [AXES[a] for a in axes if a in group]
        if len(both) > 1:
            raise ValueError(f"{' and '.join(both)} set the same thing: sweep one of them")
    names = list(axes)
    return [Cell(tuple(zip(names, combo))) for combo in itertools.product(*(axes[a] for a in names))]


def check_base_args(base_args: Sequence[str], axes: Iterable[str]) -> None:
    """Refuse base flags the sweep sets per cell (the grid's own flags and the output paths).

    Raises:
        ValueError: naming the flag.
    """
    axes = list(axes)
    owned = {AXES[a] for a in axes} | set(RESERVED)
    for group in EXCLUSIVE:   # a cell's batch (warmup) flag replaces the base's other spelling
        if any(a in group for a in axes):
            owned |= {AXES[a] for a in group}
    for a in base_args:
        flag = a.split("=", 1)[0]
        if flag in owned:
            raise ValueError(f"the base flags give {flag}, which the sweep sets in every cell: "
                             "leave it out")


def metrics_path(out_dir: str, cell: Cell) -> str:
    """Where the cell's run writes its metrics.jsonl."""
    return os.path.join(out_dir, cell.name, "metrics.jsonl")


def cell_command(cell: Cell, base_args: Sequence[str], out_dir: str, nproc_per_node: int = 1,
                 script: str = "pretrain_llama.py", python: str = sys.executable) -> list[str]:
    """The argv of one cell's run: ``pretrain_llama.py`` (through torchrun when
    ``nproc_per_node`` > 1) with the base flags, the cell's flags and its own ``--metrics-file``;
    ``--log-interval 1`` unless the base flags give one (every step's loss in metrics.jsonl:
    the first loss is the divergence reference, a non-finite one marks the run diverged)."""
    launcher = [python, script] if nproc_per_node <= 1 else \
        [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(nproc_per_node), script]
    given = {a.split("=", 1)[0] for a in base_args}
    logging = [] if "--log-interval" in given else ["--log-interval", "1"]
    return launcher + list(base_args) + logging + cell.flags() + \
        ["--metrics-file", metrics_path(out_dir, cell)]


@dataclasses.dataclass
class CellResult:
    """What a cell's metrics.jsonl says: its final validation loss and whether it diverged."""

    cell: Cell
    final_val_loss: float | None
    final_val_step: int | None
    first_train_loss: float | None
    status: str
    metrics_file: str
    best: bool = False


def read_cell(cell: Cell, path: str, exit_status: int | None = None,
              diverge_ratio: float = 1.0) -> CellResult:
    """Read a cell's metrics.jsonl (records of type ``train`` and ``eval``).

    Status: ``missing`` when the file is absent or holds no record (a run not started yet);
    ``diverged`` when a train or validation loss is non-finite (JSON null), or the final
    validation loss exceeds ``diverge_ratio`` x the first logged train loss (the loss went above
    where it started); ``failed`` when the run exited non-zero or wrote no validation record;
    else ``ok``.
    """
    train, evals = [], []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue   # a line cut by a killed run
                kind = rec.get("type", "train")
                if kind == "train" and "loss" in rec:
                    train.append(rec)
                elif kind == "eval":
                    evals.append(rec)
    first = _num(train[0]["loss"]) if train else None
    last_eval = evals[-1] if evals else None
    val = _num(last_eval["val_loss"]) if last_eval else None
    step = int(last_eval["step"]) if last_eval else None
    nonfinite = any(_num(r["loss"]) is None for r in train) or \
        any(_num(r.get("val_loss")) is None for r in evals)
    if not train and not evals:
        status = FAILED if exit_status else MISSING
    elif nonfinite or (val is not None and first is not None and val > diverge_ratio * first):
        status = DIVERGED
    elif exit_status or val is None:
        status = FAILED
    else:
        status = OK
    return CellResult(cell, val, step, first, status, path)


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def mark_best(results: Sequence[CellResult]) -> CellResult | None:
    """Set ``best`` on the ``ok`` cell with the lowest final validation loss (first on ties)."""
    ok = [r for r in results if r.status == OK and r.final_val_loss is not None]
    for r in results:
        r.best = False
    if not ok:
        return None
    best = min(ok, key=lambda r: r.final_val_loss)
    best.best = True
    return best


def csv_text(results: Sequence[CellResult], axes: Sequence[str]) -> str:
    """The table: one row per cell, the axes' values, final validation loss, status, best."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([CSV_COLUMNS[0], *axes, *CSV_COLUMNS[1:]])
    for r in results:
        vals = dict(r.cell.values)
        w.writerow([r.cell.name, *(vals[a] for a in axes),
                    "" if r.final_val_loss is None else repr(r.final_val_loss),
                    "" if r.final_val_step is None else r.final_val_step,
                    "" if r.first_train_loss is None else repr(r.first_train_loss),
                    r.status, int(r.best), r.metrics_file])
    return buf.getvalue()


@dataclasses.dataclass
class Heatmap:
    """The figure's data: ``values[i][j]`` is the cell at y value ``y_values[i]`` and x value
    ``x_values[j]`` (None where no finite loss), ``labels`` the text drawn in each cell,
    ``best`` the (i, j) of the best cell (None if none)."""

    x_axis: str
    y_axis: str | None
    x_values: list[str]
    y_values: list[str]
    values: list[list[float | None]]
    status: list[list[str]]
    labels: list[list[str]]
    best: tuple[int, int] | None


def heatmap_data(results: Sequence[CellResult], axes: Sequence[str]) -> Heatmap:
    """Arrange the results on the grid (x: the first axis, y: the second, or one row)."""
    x_axis, y_axis = axes[0], (axes[1] if len(axes) > 1 else None)
    xs = list(dict.fromkeys(dict(r.cell.values)[x_axis] for r in results))
    ys = list(dict.fromkeys(dict(r.cell.values)[y_axis] for r in results)) if y_axis else [""]
    values = [[None] * len(xs) for _ in ys]
    status = [[MISSING] * len(xs) for _ in ys]
    labels = [[MISSING] * len(xs) for _ in ys]
    best = None
    for r in results:
        v = dict(r.cell.values)
        i, j = (ys.index(v[y_axis]) if y_axis else 0), xs.index(v[x_axis])
        status[i][j] = r.status
        if r.status == OK:
            values[i][j] = r.final_val_loss
            labels[i][j] = f"{r.final_val_loss:.4f}"
        elif r.status == DIVERGED:
            labels[i][j] = "diverged" if r.final_val_loss is None else f"diverged\n{r.final_val_loss:.3g}"
        else:
            labels[i][j] = r.status
        if r.best:
            best = (i, j)
            labels[i][j] += "\n(best)"
    return Heatmap(x_axis, y_axis, xs, ys, values, status, labels, best)


def draw_heatmap(hm: Heatmap, path: str, title: str = "final validation loss") -> None:
    """Write the heatmap PNG: colour = final validation loss (lower is better), the value in each
    cell, diverged/failed/missing cells hatched grey with their status, the best cell outlined."""
    import matplotlib  # why: optional plotting dependency, only needed to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # why: as above

    ny, nx = len(hm.y_values), len(hm.x_values)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * nx, 1.2 + 1.0 * ny))
    grid = [[float("nan") if v is None else v for v in row] for row in hm.values]
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="#d0d0d0")
    im = ax.imshow(grid, cmap=cmap, aspect="auto")
    fig.colorbar(im, ax=ax, label="val loss")
    for i in range(ny):
        for j in range(nx):
            if hm.status[i][j] != OK:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//",
                                           edgecolor="#888888", linewidth=0))
            light = hm.status[i][j] != OK or im.norm(grid[i][j]) < 0.5   # viridis_r: low = yellow
            ax.text(j, i, hm.labels[i][j], ha="center", va="center", fontsize=8,
                    color="black" if light else "white")
    if hm.best is not None:
        i, j = hm.best
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=3))
    ax.set_xticks(range(nx), hm.x_values)
    ax.set_yticks(range(ny), hm.y_values)
    ax.set_xlabel(AXES[hm.x_axis])
    ax.set_ylabel(AXES[hm.y_axis] if hm.y_axis else "")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run_cells(cells: Sequence[Cell], base_args: Sequence[str], out_dir: str, nproc_per_node: int = 1,
              script: str = "pretrain_llama.py", log=print) -> dict[str, int]:
    """Run the cells one after the other; each run's console output goes to ``<cell>/log.txt``.

    Returns:
        cell name -> exit status.
    """
    statuses = {}
    for k, cell in enumerate(cells, 1):
        os.makedirs(os.path.join(out_dir, cell.name), exist_ok=True)
        cmd = cell_command(cell, base_args, out_dir, nproc_per_node, script)
        log(f"[{k}/{len(cells)}] {cell.name}: {' '.join(cmd)}")
        with open(os.path.join(out_dir, cell.name, "log.txt"), "w") as f:
            statuses[cell.name] = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
        log(f"[{k}/{len(cells)}] {cell.name}: exit status {statuses[cell.name]}")
    return statuses


def collect(cells: Sequence[Cell], axes: Sequence[str], out_dir: str, statuses: dict[str, int] | None = None,
            diverge_ratio: float = 1.0) -> tuple[list[CellResult], Heatmap]:
    """Read every cell, mark the best, write ``results.csv`` and ``heatmap.png`` in ``out_dir``."""
    statuses = statuses or {}
    results = [read_cell(c, metrics_path(out_dir, c), statuses.get(c.name), diverge_ratio) for c in cells]
    mark_best(results)
    hm = heatmap_data(results, axes)
    atomic_write_text(os.path.join(out_dir, "results.csv"), csv_text(results, axes))
    draw_heatmap(hm, os.path.join(out_dir, "heatmap.png"))
    return results, hm


__all__ = ["AXES", "Cell", "CellResult", "Heatmap", "cell_command", "check_base_args", "collect",
           "csv_text", "draw_heatmap", "expand_grid", "heatmap_data", "mark_best", "metrics_path",
           "parse_values", "read_cell", "run_cells"]
