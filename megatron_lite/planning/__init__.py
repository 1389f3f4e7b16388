"""Run planning before spending a cluster (issue 7).

- :mod:`.memory`: per-device model states under ZeRO 0-3 / offload (ZeRO paper) and activations
  (Korthikanti et al. 2022, adapted to the LLaMA block), largest micro-batch that fits.
- :mod:`.time_cost`: 6·N·T, tokens/s from MFU, days, GPU-hours, kWh, ¥, the recipe's 8·C·P formula.
- :mod:`.chinchilla`: Hoffmann et al. 2022 approach-3 loss and compute-optimal N, T; 20 tokens/param.
- :mod:`.plan`: all of the above for one run as a flat dict (``tools/plan_run.py`` prints it).
"""
