"""A run doctor: reads a run's logs the way the recipe's chapter 11 ("reading the training log")
does and names what looks wrong, with the evidence and the usual remedy.

Every check works on the ``type: train`` records of metrics.jsonl (one per ``--log-interval``;
``loss`` is the interval's mean, ``step_loss`` the logged step's own), the ``type: eval`` records
(``val_loss`` and per corpus ``val_loss/<name>``), the spike guard's captures (``spikes/``) and
the resolved config (``--clip-grad``, the warmup length). "After warmup" means steps greater than
the warmup length (config ``derived.lr_warmup_iters``, ``--warmup-steps``, else the step of the
highest logged LR). A short median (of 3 records) stands in for the loss where one noisy
record must not decide.

Findings (``code``: severity):

* ``loss_spike`` (warning; critical from ``max_spikes`` spikes): a capture file, a ``spikes``
  counter increase, or a logged loss above the median of the previous ``spike_window`` records
  by more than ``spike_sigma`` robust standard deviations (1.4826 MAD, floored at 1 % of the
  median) that falls back on the next record.
* ``divergence`` (critical): after warmup the loss median rose by more than ``divergence_rise``
  above its lowest value and stays there at the end, or the last 3 records have no finite loss.
* ``grad_norm_growth`` (warning): after warmup the median grad norm of the last quarter is
  ``grad_norm_growth`` times that of the first quarter (reported inside ``divergence`` instead
  when the loss diverges too).
* ``lr_warmup_rise`` (warning): the loss rose by more than ``warmup_rise`` during warmup.
* ``no_progress`` (warning): the loss after warmup fell by less than ``min_progress`` from its
  start to its end (divergence reported instead when it rose that much).
* ``plateau`` (warning): over the last ``plateau_fraction`` of the records after warmup (at least
  6, of at least 8), the mean loss of the second half is within ``plateau_min_drop`` of the first
  half's.
* ``skipped_steps`` (warning): skipped (non-finite) steps above ``max_skipped_fraction`` of the
  steps.
* ``grad_clipping`` (warning): after warmup the grad norm exceeds ``--clip-grad`` on more than
  ``clip_fraction`` of the logged steps.
* ``data_stall`` (warning): data wait is more than ``data_wait_share`` of the step time (the
  first record, which holds the loaders' start-up, left out).
* ``throughput_drop`` (warning): tokens/s of at least 2 records (or of the last one) below
  ``1 - throughput_drop`` times the run's median (first record left out).
* ``eval_loss_rising`` (warning; one per series, ``val_loss`` and each ``val_loss/<corpus>``):
  validation loss above its lowest value by more than ``eval_rise`` at the last evaluation
  while the train loss fell over the same steps.
* ``corpus_divergence`` (warning): with 2 or more corpora, one whose relative validation-loss
  change from the first to the last evaluation is worse than the median of the others by more
  than ``corpus_gap`` (corpora already reported as rising are not repeated).

Exit status of :func:`exit_status`: 0 healthy, 1 warnings only, 2 at least one critical finding.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Optional

from megatron_lite.analysis.run_data import RunData, series, skipped_steps, spike_steps

WARNING, CRITICAL = "warning", "critical"


@dataclasses.dataclass
class Thresholds:
    """The doctor's thresholds (each a flag of ``tools/diagnose_run.py``; see the module doc)."""
    spike_sigma: float = 6.0
    spike_window: int = 10
    max_spikes: int = 3
    divergence_rise: float = 0.10
    grad_norm_growth: float = 3.0
    warmup_rise: float = 0.05
    min_progress: float = 0.01
    plateau_fraction: float = 0.3
    plateau_min_drop: float = 0.005
    max_skipped_fraction: float = 0.01
    clip_fraction: float = 0.5
    data_wait_share: float = 0.10
    throughput_drop: float = 0.30
    eval_rise: float = 0.02
    corpus_gap: float = 0.05
    clip_grad: Optional[float] = None       # overrides the config's --clip-grad
    warmup_steps: Optional[int] = None      # overrides the config's warmup length


@dataclasses.dataclass
class Finding:
    """One diagnosis: ``code`` (see the module doc), ``severity`` (warning/critical), a one-line
    ``summary``, ``evidence`` lines (steps, values), the ``remedy``, the ``steps`` concerned and
    machine-readable ``data``."""
    code: str
    severity: str
    summary: str
    evidence: list
    remedy: str
    steps: list = dataclasses.field(default_factory=list)
    data: dict = dataclasses.field(default_factory=dict)


REMEDIES = {
    "loss_spike": "A single spike that recovers within a few steps can be tolerated; repeated or "
    "early ones cannot. Read the captured samples of the spike step first (garbled text, long "
    "runs of digits, broken markup): most spikes are bad data, to clean or drop. If the data "
    "look normal, lower --lr or lengthen the warmup, and keep --spike-detection on (policy skip "
    "or rollback) so the next one is contained.",
    "divergence": "Stop the run. Restart from the last checkpoint before the rise with a much "
    "lower learning rate (halve --lr), keep --clip-grad at 1.0, and check recent changes to the "
    "data and the code (RoPE scaling, precision) before spending more compute.",
    "grad_norm_growth": "A grad norm that keeps growing after warmup precedes divergence: lower "
    "--lr, check --clip-grad, and watch the loss closely; restart from a checkpoint if it rises.",
    "lr_warmup_rise": "The peak LR is too high for this model and batch: lower --lr or lengthen "
    "the warmup (--lr-warmup-iters/--lr-warmup-tokens). Larger models need smaller LRs; after "
    "changing the global batch, rescale the LR (--lr-scaling sqrt or linear).",
    "no_progress": "The LR does not fit: too high (the updates are noise) or too low (no "
    "progress). Compare short runs over an LR grid (tools/lr_sweep.py) and check the data "
    "(tokenizer, labels, loss mask).",
    "plateau": "Check the LR schedule (a decay that is too fast or a --min-lr that is too low "
    "leaves no step size; consider re-warming the LR from a checkpoint) and the mixture (a "
    "high-quality source may be used up or repeated for many epochs).",
    "skipped_steps": "Steps with a non-finite loss were skipped. Check the precision (fp16 "
    "overflow, the loss scale; prefer bf16), the LR, and the data of the skipped steps; a "
    "growing count is a numerical stability problem, not noise.",
    "grad_clipping": "The grad norm is above --clip-grad on most steps, so nearly every update is "
    "clipped: a sign the LR is too high for this batch. Lower --lr or lengthen the warmup rather "
    "than raising the threshold.",
    "data_stall": "The model waits for data. Raise --num-workers, keep pinned memory, look for "
    "slow Python-side preprocessing (GIL) and measure the storage's read speed.",
    "throughput_drop": "Compare the step-time breakdown of the slow intervals with the fast ones "
    "(tools/plot_run.py step_time, --timing-log-level 2, --profile): data loading, TP/ZeRO "
    "communication or the optimizer step; look for other jobs on the nodes, a slow node or "
    "throttling.",
    "eval_loss_rising": "Validation loss rises while the train loss falls: the model fits what it "
    "trains on but no longer generalises to this data. Check how many epochs the corpus is "
    "repeated, give the corpus more weight or fresh data, or keep the best checkpoint.",
    "corpus_divergence": "This corpus improves much less than the others: its weight may be too "
    "low, its data different (language, domain, tokenisation) or repeated. Inspect its samples "
    "and adjust the --data-path weights.",
}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _med3(ys: list) -> list:
    return [statistics.median(ys[max(0, i - 2):i + 1]) for i in range(len(ys))]


def _g(v: float) -> str:
    return f"{v:.4g}"


def _finding(code: str, severity: str, summary: str, evidence: list, steps=(), **data) -> Finding:
    return Finding(code, severity, summary, list(evidence), REMEDIES[code], sorted(set(steps)),
                   data)


def warmup_steps(run: RunData, th: Thresholds) -> int:
    """The warmup length in steps (flag, config, else the step of the highest logged LR)."""
    if th.warmup_steps is not None:
        return th.warmup_steps
    w = run.cfg("derived", "lr_warmup_iters")
    if w is not None:
        return int(w)
    xs, ys = series(run.train, "lr")
    return int(xs[ys.index(max(ys))]) if ys else 0


def _loss_points(run: RunData, step_loss: bool = False,
                 leave_out: frozenset = frozenset()) -> tuple[list, list]:
    """Per train record: the interval's mean loss (with ``step_loss``: the step's own when the
    mean is null, as for a step the spike guard skipped); steps in ``leave_out`` are left out."""
    xs, ys = [], []
    for r in run.train:
        v = r.get("loss")
        if step_loss and not _finite(v):
            v = r.get("step_loss")
        if _finite(v) and r["step"] not in leave_out:
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def _sample_line(w: dict) -> str:
    text = (w.get("text") or "").replace("\n", " ")[:80]
    shown = repr(text) if text else f"token ids {(w.get('token_ids') or [])[:12]}"
    return (f"\n    sample {w.get('sample_id')} (dataset {w.get('dataset_id')}) loss "
            f"{_g(w.get('loss') or math.nan)}: {shown}")


def check_spikes(run: RunData, th: Thresholds) -> list[Finding]:
    """``loss_spike``: captures, counter increases and the logged loss (module doc)."""
    events = spike_events(run, th)
    if not events:
        return []
    sev = CRITICAL if len(events) >= th.max_spikes else WARNING
    return [_finding("loss_spike", sev, f"{len(events)} loss spike(s) at step(s) "
                     f"{', '.join(map(str, sorted(events)))}",
                     [events[s] for s in sorted(events)], events, count=len(events))]


def spike_events(run: RunData, th: Thresholds) -> dict[int, str]:
    """Spike step -> evidence line (captures, counter increases, the logged loss)."""
    events: dict[int, str] = {}
    for s in run.spikes:
        h = s.header
        line = (f"step {s.step}: {h.get('criterion', '?')} {_g(h.get('value', math.nan))} vs "
                f"window mean {_g(h.get('window_mean', math.nan))} (std "
                f"{_g(h.get('window_std', math.nan))}), action {h.get('action', '?')}; "
                f"capture {s.path}")
        events[s.step] = line + "".join(_sample_line(w) for w in s.worst[:3])
    for step in spike_steps(run):
        events.setdefault(step, f"step {step}: the spike guard's counter rose")
    xs, ys = _loss_points(run, step_loss=True)
    for i in range(len(ys) - 1):
        prev = ys[max(0, i - th.spike_window):i]
        if len(prev) < 5:
            continue
        m = statistics.median(prev)
        sigma = max(1.4826 * statistics.median(abs(v - m) for v in prev), 0.01 * abs(m))
        if ys[i] > m + th.spike_sigma * sigma and ys[i + 1] < ys[i] - 0.5 * (ys[i] - m):
            events.setdefault(xs[i], f"step {xs[i]}: loss {_g(ys[i])} vs median {_g(m)} of the "
                                     f"previous {len(prev)} records, back to {_g(ys[i + 1])} next")
    return events


def _trend_points(run: RunData, th: Thresholds) -> tuple[list, list]:
    """The logged mean losses without the spike steps (a spike is reported once, as a spike)."""
    return _loss_points(run, leave_out=frozenset(spike_events(run, th)))


def _post_warmup(run: RunData, th: Thresholds) -> tuple[list, list]:
    w = warmup_steps(run, th)
    xs, ys = _trend_points(run, th)
    keep = [(x, y) for x, y in zip(xs, ys) if x > w]
    return [k[0] for k in keep], [k[1] for k in keep]


def _grad_growth(run: RunData, th: Thresholds) -> Optional[tuple[int, float, int, float]]:
    w = warmup_steps(run, th)
    xs, ys = series([r for r in run.train if r["step"] > w], "grad_norm")
    q = len(ys) // 4
    if q < 2:
        return None
    a, b = statistics.median(ys[:q]), statistics.median(ys[-q:])
    return (xs[0], a, xs[-1], b) if a > 0 and b > th.grad_norm_growth * a else None


def check_trend(run: RunData, th: Thresholds) -> list[Finding]:
    """``divergence``, ``grad_norm_growth``, ``no_progress``, ``plateau`` (module doc)."""
    tail = run.train[-3:]
    if len(tail) == 3 and not any(_finite(r.get("loss")) for r in tail):
        return [_finding("divergence", CRITICAL, "the loss is no longer finite at the end",
                         [f"steps {tail[0]['step']}..{tail[-1]['step']}: no finite loss"],
                         [r["step"] for r in tail])]
    xs, ys = _post_warmup(run, th)
    growth = _grad_growth(run, th)
    grow_line = [] if growth is None else [
        f"grad norm median {_g(growth[1])} (from step {growth[0]}) -> {_g(growth[3])} (to step "
        f"{growth[2]})"]
    if len(ys) < 4:
        return []
    med = _med3(ys)
    i_min = min(range(len(med)), key=med.__getitem__)
    if med[-1] > med[i_min] * (1 + th.divergence_rise) and i_min < len(med) - 1:
        rise = 100 * (med[-1] / med[i_min] - 1)
        return [_finding("divergence", CRITICAL, f"the loss rose {rise:.0f} % after its lowest "
                         f"point (step {xs[i_min]})",
                         [f"loss median {_g(med[i_min])} at step {xs[i_min]} -> {_g(med[-1])} "
                          f"at step {xs[-1]}"] + grow_line, [xs[i_min], xs[-1]])]
    out = []
    if growth is not None:
        out.append(_finding("grad_norm_growth", WARNING, "the grad norm keeps growing after "
                            "warmup", grow_line, [growth[0], growth[2]]))
    first, last = statistics.median(ys[:3]), statistics.median(ys[-3:])
    if last > first * (1 - th.min_progress):
        return out + [_finding("no_progress", WARNING, "the loss did not fall after warmup",
                               [f"loss median {_g(first)} after warmup (step {xs[0]}) -> "
                                f"{_g(last)} at step {xs[-1]}"], [xs[0], xs[-1]])]
    return out + check_plateau(xs, ys, run, th)


def check_plateau(xs: list, ys: list, run: RunData, th: Thresholds) -> list[Finding]:
    """``plateau`` on the post-warmup loss points ``(xs, ys)``."""
    n = max(6, int(round(th.plateau_fraction * len(ys))))
    if len(ys) < 8 or n > len(ys):
        return []
    t = ys[-n:]
    a, b = statistics.fmean(t[:n // 2]), statistics.fmean(t[n // 2:])
    if a - b >= th.plateau_min_drop * abs(a):
        return []
    lr = dict(zip(*series(run.train, "lr")))
    lrs = f"; LR {_g(lr[xs[-n]])} -> {_g(lr[xs[-1]])}" if xs[-n] in lr and xs[-1] in lr else ""
    return [_finding("plateau", WARNING, f"the loss stopped falling over the last {n} records",
                     [f"mean loss {_g(a)} (steps {xs[-n]}..{xs[-n + n // 2 - 1]}) -> {_g(b)} "
                      f"(steps {xs[-n + n // 2]}..{xs[-1]}){lrs}"], [xs[-n], xs[-1]])]


def check_warmup(run: RunData, th: Thresholds) -> list[Finding]:
    """``lr_warmup_rise``: the loss during warmup rose above its first value."""
    w = warmup_steps(run, th)
    pts = [(x, y) for x, y in zip(*_trend_points(run, th)) if x <= w]
    if len(pts) < 3:
        return []
    med = _med3([p[1] for p in pts])
    i = max(range(1, len(med)), key=med.__getitem__)
    if med[i] <= pts[0][1] * (1 + th.warmup_rise):
        return []
    return [_finding("lr_warmup_rise", WARNING, f"the loss rose during warmup (warmup {w} steps)",
                     [f"loss {_g(pts[0][1])} at step {pts[0][0]} -> median {_g(med[i])} at "
                      f"step {pts[i][0]}"], [pts[0][0], pts[i][0]])]


def check_skipped(run: RunData, th: Thresholds) -> list[Finding]:
    """``skipped_steps``: the share of skipped steps."""
    if not run.train:
        return []
    total = max(int(r.get("skipped_steps") or 0) for r in run.train)
    last = run.train[-1]["step"]
    if last <= 0 or total / last <= th.max_skipped_fraction:
        return []
    steps = skipped_steps(run)
    evidence = [f"logged at step(s) {', '.join(map(str, steps[:20]))}"]
    guard = sorted(set(steps) & set(spike_steps(run)))
    if guard:
        evidence.append(f"the spike guard skipped step(s) {', '.join(map(str, guard))} "
                        "(--spike-policy skip): see loss_spike")
    return [_finding("skipped_steps", WARNING, f"{total} of {last} steps skipped "
                     f"({100 * total / last:.1f} %)", evidence, steps, skipped=total)]


def check_clipping(run: RunData, th: Thresholds) -> list[Finding]:
    """``grad_clipping``: grad norm above --clip-grad on most logged steps after warmup."""
    clip = th.clip_grad if th.clip_grad is not None else run.cfg("optimizer", "clip_grad")
    if not clip or clip <= 0:
        return []
    w = warmup_steps(run, th)
    xs, ys = series([r for r in run.train if r["step"] > w], "grad_norm")
    above = [x for x, y in zip(xs, ys) if y > clip]
    if len(xs) < 3 or len(above) <= th.clip_fraction * len(xs):
        return []
    return [_finding("grad_clipping", WARNING, f"grad norm above --clip-grad {clip:g} on "
                     f"{len(above)} of {len(xs)} logged steps after warmup",
                     [f"median grad norm {_g(statistics.median(ys))}, max {_g(max(ys))}"], above)]


def check_data_stall(run: RunData, th: Thresholds) -> list[Finding]:
    """``data_stall``: data wait share of the step time."""
    recs = [r for r in run.train[1:] if _finite(r.get("data_wait_s")) and
            _finite(r.get("step_time_s"))]
    total = sum(r["step_time_s"] for r in recs)
    if not recs or total <= 0:
        return []
    share = sum(r["data_wait_s"] for r in recs) / total
    if share <= th.data_wait_share:
        return []
    worst = sorted(recs, key=lambda r: -r["data_wait_s"] / max(r["step_time_s"], 1e-12))[:3]
    return [_finding("data_stall", WARNING, f"data wait is {100 * share:.0f} % of the step time",
                     [f"step {r['step']}: data wait {r['data_wait_s'] * 1e3:.1f} ms of "
                      f"{r['step_time_s'] * 1e3:.1f} ms" for r in worst],
                     [r["step"] for r in worst], share=share)]


def check_throughput(run: RunData, th: Thresholds) -> list[Finding]:
    """``throughput_drop``: tokens/s against the run's own median."""
    xs, ys = series(run.train[1:], "tokens_per_sec")
    if len(ys) < 3:
        return []
    m = statistics.median(ys)
    slow = [(x, y) for x, y in zip(xs, ys) if y < (1 - th.throughput_drop) * m]
    if not (len(slow) >= 2 or (slow and slow[-1][0] == xs[-1])):
        return []
    mfu = {r["step"]: r.get("mfu") for r in run.train}
    lines = [f"step {x}: {y:.1f} tokens/s" + (f", MFU {100 * mfu[x]:.2f} %" if _finite(mfu.get(x))
                                                else "") for x, y in slow[:10]]
    return [_finding("throughput_drop", WARNING, f"{len(slow)} logged interval(s) below "
                     f"{100 * (1 - th.throughput_drop):.0f} % of the median {m:.1f} tokens/s",
                     lines, [x for x, _ in slow], median=m)]


def _train_loss_near(run: RunData, step: float) -> Optional[float]:
    xs, ys = _loss_points(run)
    near = [y for x, y in zip(xs, ys) if x <= step][-3:]
    return statistics.median(near) if near else None


def check_eval(run: RunData, th: Thresholds) -> list[Finding]:
    """``eval_loss_rising`` (blend and each corpus) and ``corpus_divergence``."""
    out, rising = [], set()
    for key in ["val_loss"] + [f"val_loss/{c}" for c in run.corpora()]:
        xs, ys = series(run.evals, key)
        if len(ys) < 3:
            continue
        i = min(range(len(ys)), key=ys.__getitem__)
        a, b = _train_loss_near(run, xs[i]), _train_loss_near(run, xs[-1])
        if i == len(ys) - 1 or ys[-1] <= ys[i] * (1 + th.eval_rise) or a is None or b is None \
                or b >= a:
            continue
        what = "validation" if key == "val_loss" else f"validation on {key[9:]}"
        rising.add(key)
        out.append(_finding("eval_loss_rising", WARNING, f"{what} loss rises while the train "
                            "loss falls", [f"{key} {_g(ys[i])} at step {xs[i]} -> {_g(ys[-1])} at "
                                           f"step {xs[-1]}; train loss {_g(a)} -> {_g(b)}"],
                            [xs[i], xs[-1]], series=key))
    change = {}
    for c in run.corpora():
        xs, ys = series(run.evals, f"val_loss/{c}")
        if len(ys) >= 2 and ys[0] > 0:
            change[c] = (ys[-1] / ys[0] - 1, xs[0], xs[-1], ys[0], ys[-1])
    for c, (d, x0, x1, y0, y1) in change.items():
        others = [v[0] for k, v in change.items() if k != c]
        if not others or f"val_loss/{c}" in rising:
            continue
        m = statistics.median(others)
        if d - m > th.corpus_gap:
            out.append(_finding("corpus_divergence", WARNING, f"corpus {c} lags the others",
                                [f"val_loss/{c} {_g(y0)} -> {_g(y1)} ({100 * d:+.1f} %) from step "
                                 f"{x0} to {x1}; median of the others {100 * m:+.1f} %"],
                                [x0, x1], corpus=c))
    return out


CHECKS = (check_spikes, check_trend, check_warmup, check_skipped, check_clipping,
          check_data_stall, check_throughput, check_eval)


def diagnose(run: RunData, th: Optional[Thresholds] = None) -> list[Finding]:
    """Every finding of the run, critical ones first (module doc lists the checks)."""
    th = th or Thresholds()
    found = [f for check in CHECKS for f in check(run, th)]
    return sorted(found, key=lambda f: f.severity != CRITICAL)


def exit_status(findings: list[Finding]) -> int:
    """0 when no finding, 2 with a critical one, else 1."""
    if any(f.severity == CRITICAL for f in findings):
        return 2
    return 1 if findings else 0


def format_report(run: RunData, findings: list[Finding]) -> str:
    """The human-readable report ``tools/diagnose_run.py`` prints."""
    steps = [r["step"] for r in run.train]
    head = (f"run {run.name}: {run.metrics_path}, {len(run.train)} train records"
            + (f" (steps {steps[0]}..{steps[-1]})" if steps else "")
            + f", {len(run.evals)} evaluations, {len(run.spikes)} spike capture(s); config: "
            + (run.config_source or "not found"))
    lines = [head]
    if not findings:
        lines.append("healthy: no finding")
    for f in findings:
        lines.append(f"[{f.severity.upper()}] {f.code}: {f.summary}")
        lines += [f"    evidence: {e}" for e in f.evidence]
        lines.append(f"    remedy: {f.remedy}")
    return "\n".join(lines)


def report_dict(run: RunData, findings: list[Finding]) -> dict:
    """The ``--json`` report: run, metrics path, config source, status, findings."""
    return {"run": run.name, "metrics": run.metrics_path, "config": run.config_source,
            "status": exit_status(findings),
            "findings": [dataclasses.asdict(f) for f in findings]}


__all__ = ["CHECKS", "CRITICAL", "Finding", "REMEDIES", "Thresholds", "WARNING", "diagnose",
           "exit_status", "format_report", "report_dict", "warmup_steps"]
