"""Data pipeline: indexed token files, packing GPT dataset, blending, samplers, batches."""
