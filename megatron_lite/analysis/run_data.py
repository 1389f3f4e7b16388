"""One run's logged data, read from its files: metrics.jsonl records, spike captures, config.

A run is named by a folder or a file:

* a ``--save`` folder (or any folder holding ``metrics.jsonl``): ``metrics.jsonl``,
  ``spikes/step_<n>[.<k>].jsonl`` and the resolved config — the newest checkpoint's
  ``run_config.json`` (the folder named by ``latest``), else the folder's ``run_info.json``
  (written at start by ``training.setup.write_run_folder``), else ``config.yaml``;
* a metrics file (``--metrics-file``): the same files are looked up in its folder.

Records whose step comes again after a rollback or a resume replace the earlier ones (as the
logger itself truncates on resume), so every series is one monotone run.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
from typing import Any, Optional

import yaml


@dataclasses.dataclass
class Spike:
    """One capture file of the spike guard: its header and the highest-loss samples.

    Attributes:
        step: the spike's step number.
        header: the ``type: spike`` record (criterion, value, window_mean, window_std, action ...).
        worst: the captured samples with ``worst_rank`` set, worst first (sample_id, dataset_id,
            loss, text).
        path: the capture file.
    """
    step: int
    header: dict
    worst: list
    path: str


@dataclasses.dataclass
class RunData:
    """Everything the plots and the doctor read about one run.

    Attributes:
        name: label in legends and reports (the folder's name).
        metrics_path: the metrics.jsonl read.
        train: ``type: train`` records in step order (one per ``--log-interval``).
        evals: ``type: eval`` records (``val_loss``, ``val_ppl``, per corpus ``val_loss/<name>``).
        tests: ``type: test`` records.
        spikes: spike captures in step order.
        config: the resolved config tree (``RunConfig.to_dict()``) or None when none was found.
        config_source: the file the config came from ("" when none).
    """
    name: str
    metrics_path: str
    train: list
    evals: list
    tests: list
    spikes: list
    config: Optional[dict]
    config_source: str

    def cfg(self, section: str, key: str, default: Any = None) -> Any:
        """A value of the resolved config (``default`` when no config or no such key)."""
        if not self.config:
            return default
        value = (self.config.get(section) or {}).get(key, default)
        return default if value is None else value

    def corpora(self) -> list[str]:
        """Names of the corpora with per-corpus validation losses (``val_loss/<name>``)."""
        names: list[str] = []
        for r in self.evals:
            for k in r:
                if k.startswith("val_loss/") and k[9:] not in names:
                    names.append(k[9:])
        return names


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(records: list, key: str, x: str = "step") -> tuple[list, list]:
    """``(xs, ys)`` of the records where both ``x`` and ``key`` are finite numbers (null/NaN
    losses of skipped intervals are left out)."""
    xs, ys = [], []
    for r in records:
        if _finite(r.get(key)) and _finite(r.get(x)):
            xs.append(r[x])
            ys.append(r[key])
    return xs, ys


def spike_steps(run: RunData) -> list[int]:
    """Steps flagged as spikes: capture files in ``spikes/``, and records whose ``spikes``
    counter grew (a log interval > 1 puts the mark at the interval's logged step)."""
    steps = {s.step for s in run.spikes}
    prev = 0
    for r in run.train:
        n = r.get("spikes")
        if isinstance(n, (int, float)) and n > prev:
            steps.add(int(r["step"]))
            prev = n
    return sorted(steps)


def skipped_steps(run: RunData) -> list[int]:
    """Logged steps of intervals with a skipped step (``step_skipped`` with --log-interval 1,
    else a ``nan_steps_in_interval`` or ``skipped_steps`` increase)."""
    out, prev = [], 0
    for r in run.train:
        total = r.get("skipped_steps") or 0
        if r.get("step_skipped") or r.get("nan_steps_in_interval") or total > prev:
            out.append(int(r["step"]))
        prev = max(prev, total)
    return out


def ema(values: list, weight: float) -> list:
    """Exponential moving average with TensorBoard's debiasing: ``s_t = w s_{t-1} + (1-w) v_t``,
    divided by ``1 - w^t``. ``weight`` 0 returns the values unchanged.

    Raises:
        ValueError: weight outside [0, 1).
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"--smooth must be in [0, 1) (got {weight})")
    out, s = [], 0.0
    for t, v in enumerate(values, start=1):
        s = weight * s + (1.0 - weight) * v
        out.append(s / (1.0 - weight ** t))
    return out


def read_records(path: str) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a kill is skipped; a step logged again
    (rollback, resume) drops the earlier records of that step and later ones of the same type.

    Raises:
        ValueError: the file holds no JSON record at all.
    """
    out: list[dict] = []
    last: dict[str, float] = {}   # type -> newest step, to notice a step logged again
    with open(path) as f:
        for ln in f:
            try:
                rec = json.loads(ln)
            except ValueError:
                continue
            if not isinstance(rec, dict) or not _finite(rec.get("step")):
                continue
            kind = rec.get("type", "train")
            if rec["step"] <= last.get(kind, -math.inf):
                out = [r for r in out
                       if r.get("type", "train") != kind or r["step"] < rec["step"]]
            last[kind] = rec["step"]
            out.append(rec)
    if not out:
        raise ValueError(f"{path}: no metrics records (one JSON object per line with a 'step')")
    return out


def read_spikes(folder: str) -> list[Spike]:
    """The spike guard's capture files in ``folder/spikes`` (step order; none: empty list)."""
    spikes = []
    for path in glob.glob(os.path.join(folder, "spikes", "step_*.jsonl")):
        m = re.match(r"step_(\d+)(?:\.(\d+))?\.jsonl$", os.path.basename(path))
        if not m:
            continue
        with open(path) as f:
            lines = [json.loads(ln) for ln in f if ln.strip()]
        header = next((r for r in lines if r.get("type") == "spike"), {})
        worst = sorted((r for r in lines if r.get("type") == "sample" and r.get("worst_rank")),
                       key=lambda r: r["worst_rank"])
        spikes.append((int(m.group(1)), int(m.group(2) or 0), Spike(int(m.group(1)), header,
                                                                     worst, path)))
    return [s for _, _, s in sorted(spikes, key=lambda t: t[:2])]


def read_config(folder: str) -> tuple[Optional[dict], str]:
    """The resolved config of the run in ``folder`` and where it came from (see module doc)."""
    latest = os.path.join(folder, "latest")
    candidates = []
    if os.path.isfile(latest):
        with open(latest) as f:
            candidates.append(os.path.join(folder, f.read().strip(), "run_config.json"))
    candidates += [os.path.join(folder, "run_info.json"), os.path.join(folder, "config.yaml")]
    for path in candidates:
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            data = yaml.safe_load(f) if path.endswith(".yaml") else json.load(f)
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            data = data["config"]
        if isinstance(data, dict):
            return data, path
    return None, ""


def load_run(path: str, name: Optional[str] = None) -> RunData:
    """Read a run folder or a metrics.jsonl path (see the module doc).

    Raises:
        FileNotFoundError: no such path, or a folder without metrics.jsonl.
        ValueError: the metrics file holds no record.
    """
    if os.path.isdir(path):
        folder, metrics = path, os.path.join(path, "metrics.jsonl")
        if not os.path.isfile(metrics):
            raise FileNotFoundError(f"{path}: no metrics.jsonl in this folder; give the run's "
                                    "--save folder or its --metrics-file")
    elif os.path.isfile(path):
        folder, metrics = os.path.dirname(os.path.abspath(path)), path
    else:
        raise FileNotFoundError(f"{path}: no such run folder or metrics file")
    records = read_records(metrics)
    config, source = read_config(folder)
    stem = os.path.basename(metrics)[:-len(".jsonl")] if metrics.endswith(".jsonl") else ""
    label = name or (stem if stem and stem != "metrics" else
                     os.path.basename(os.path.normpath(folder))) or metrics
    return RunData(
        name=label, metrics_path=metrics,
        train=[r for r in records if r.get("type", "train") == "train"],
        evals=[r for r in records if r.get("type") == "eval"],
        tests=[r for r in records if r.get("type") == "test"],
        spikes=read_spikes(folder), config=config, config_source=source)


__all__ = ["RunData", "Spike", "ema", "load_run", "read_config", "read_records", "read_spikes",
           "series", "skipped_steps", "spike_steps"]
