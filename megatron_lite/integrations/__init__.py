"""Adapters to other frameworks: ``megatron_lite.integrations.lightning`` (PyTorch Lightning)."""
