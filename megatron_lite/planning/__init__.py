"""Run planning: memory per device, time and cost, compute-optimal sizing (see each module)."""
