"""Reading a finished (or running) training run: its metrics.jsonl, spike captures and resolved
config (``run_data``), figures of the curves (``plots``) and a rule-based diagnosis (``doctor``).

Used by ``tools/plot_run.py`` and ``tools/diagnose_run.py``; reads files only (run_data and doctor
import no torch; plots takes the step-time breakdown's field list from training.metrics).
"""
