"""Data pipeline: indexed token files, packing GPT dataset, blending, samplers, batches.

Entry points: :func:`build_train_valid_test_datasets` and :func:`build_data_loader`; batches follow
docs/interfaces.md ("Batch").

Names are imported lazily (PEP 562) so that light users — tools/preprocess_data.py workers,
text readers, the tokenizer — do not pay for importing torch.
"""

import importlib

_EXPORTS = {
    "BlendedDataset": "blended",
    "build_data_loader": "builder",
    "build_train_valid_test_datasets": "builder",
    "collate_samples": "collate",
    "DataConfig": "data_config",
    "parse_data_path": "data_config",
    "GPTDataset": "gpt_dataset",
    "IndexedDataset": "indexed",
    "IndexedDatasetBuilder": "indexed",
    "best_dtype": "indexed",
    "MegatronPretrainingRandomSampler": "sampler",
    "MegatronPretrainingSampler": "sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
