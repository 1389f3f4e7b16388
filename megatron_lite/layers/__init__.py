"""Tensor-parallel layers: column/row-parallel linear, vocab-parallel embedding, LM head, cross entropy."""

from megatron_lite.layers.cross_entropy import vocab_parallel_cross_entropy
from megatron_lite.layers.embedding import VocabParallelEmbedding, parallel_lm_logits
from megatron_lite.layers.init import set_tensor_model_parallel_attributes, sharded_normal_weight
from megatron_lite.layers.linear import ColumnParallelLinear, RowParallelLinear

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "parallel_lm_logits",
           "vocab_parallel_cross_entropy", "sharded_normal_weight", "set_tensor_model_parallel_attributes"]
