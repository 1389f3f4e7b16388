"""Data pipeline: indexed token files, packing GPT dataset, blending, samplers, batches.

Entry points: :func:`build_train_valid_test_datasets` and :func:`build_data_loader`; batches follow
docs/interfaces.md ("Batch").
"""

from megatron_lite.data.blended import BlendedDataset
from megatron_lite.data.builder import build_data_loader, build_train_valid_test_datasets
from megatron_lite.data.collate import collate_samples
from megatron_lite.data.config import DataConfig, parse_data_path
from megatron_lite.data.gpt_dataset import GPTDataset
from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetBuilder, best_dtype
from megatron_lite.data.sampler import MegatronPretrainingRandomSampler, MegatronPretrainingSampler

__all__ = ["BlendedDataset", "DataConfig", "GPTDataset", "IndexedDataset", "IndexedDatasetBuilder",
           "MegatronPretrainingRandomSampler", "MegatronPretrainingSampler", "best_dtype",
           "build_data_loader", "build_train_valid_test_datasets", "collate_samples", "parse_data_path"]
