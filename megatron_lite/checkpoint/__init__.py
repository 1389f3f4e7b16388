"""Checkpoints: folder layout, manifest and ``latest``; engine state save/load; weight loading;
ZeRO resharding; base-checkpoint detection. Imports nothing from ``training/`` (the Trainer and
the tools call it, never the other way round). Modules are imported by their own names."""
