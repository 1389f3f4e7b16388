"""Checkpoints: everything about reading and writing them, imported by module name.

* :mod:`~megatron_lite.checkpoint.layout` - folder names, manifest, ``latest``, completeness,
  listing, pruning, the saved config;
* :mod:`~megatron_lite.checkpoint.engine_state` - atomic save and resume of a training run through
  the DeepSpeed engine (model, optimizer, schedule, counters, RNG);
* :mod:`~megatron_lite.checkpoint.compat` - whether a checkpoint fits this run (model, frozen set);
* :mod:`~megatron_lite.checkpoint.weights` - module weights: one TP shard, the ZeRO-3 gather,
  loading into a (partitioned) model, loading for inference at any TP degree;
* :mod:`~megatron_lite.checkpoint.hf_files` - the weight files of a HuggingFace folder;
* :mod:`~megatron_lite.checkpoint.base_checkpoint` - the base checkpoint of a CPT run (HF or ours);
* :mod:`~megatron_lite.checkpoint.zero_reshard` - resuming ZeRO optimizer state at another D.

Imports nothing from ``training/``, ``cpt/``, ``eval/`` or ``convert/`` (the Trainer, CPT and the
tools call it, never the other way round).
"""
