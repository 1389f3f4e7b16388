"""``LlamaModel``: the tensor-parallel LLaMA decoder (docs/interfaces.md, "Model").

Structure (matches HF ``LlamaForCausalLM`` numerically): vocab-parallel embedding -> L pre-norm
blocks (RMSNorm, RoPE GQA attention, SwiGLU MLP, no biases) -> final RMSNorm -> vocab-parallel LM
head (its own weight, or the embedding's with ``--tie-word-embeddings``) -> fp32 logits
``[b, s, V_pad/TP]`` with padded-vocab columns masked, or the per-token vocab-parallel cross
entropy ``[b, s]`` when labels are given. All communication goes through ``megatron_lite.layers``.

Sequence parallelism (``config.sequence_parallel``, TP > 1; Megatron-LM's ``--sequence-parallel``):
the embedding's partial lookups are reduce-scattered along the sequence, so the residual stream
between the blocks is this rank's ``[b, s/TP, H]``; the final norm runs on that slice, then the
slices are all-gathered to ``[b, s, H]`` for the LM head (whose backward reduce-scatters the
gradient). A forward whose length is not divisible by TP (generation) is padded at the end of each
row to the next multiple of TP and the outputs cut back (causal attention: the padding changes
no real position; see :meth:`LlamaModel.forward`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_lite.layers.embedding import VocabParallelEmbedding, parallel_lm_logits
from megatron_lite.layers.init import resolve_device, set_tensor_model_parallel_attributes
from megatron_lite.layers.linear import ColumnParallelLinear
from megatron_lite.layers.lm_head_loss import lm_head_cross_entropy
from megatron_lite.model.transformer import RMSNorm, TransformerLayer
from megatron_lite.parallel.context_parallel import local_token_positions
from megatron_lite.parallel.mappings import gather_from_sequence_parallel_region
from megatron_lite.parallel.random import get_rng_tracker, recompute_rng_context
from megatron_lite.parallel.state import get_tensor_model_parallel_world_size


class LlamaModel(torch.nn.Module):
    """This rank's TP shard of a LLaMA-style decoder.

    Args:
        config: ``ModelConfig``; validated here for the current TP degree. ``vocab_size`` must be set.
        device: parameter device (default: torch's default device). ``"meta"`` builds shapes only
            (no memory, no init), e.g. to count parameters of a 13B config, or to load converted
            weights without paying for init: ``model.load_state_dict(sd, assign=True)`` (TP
            attributes are re-applied to the assigned parameters).

    Init (TP-independent, from the caller's ``torch.manual_seed``): every weight ~ N(0, std^2) with
    std = ``--init-method-std``, output projections (o_proj, down_proj) std / sqrt(2 L), norm
    weights 1, padded vocab rows 0. Parameters: ``embedding.weight``, ``layers.i.input_layernorm``,
    ``layers.i.self_attn.{qkv_proj,o_proj}`` (plus ``qkv_proj.kv_weight``, the replicated K/V rows
    of one KV group, when ``num_query_groups`` < TP), ``layers.i.post_attention_layernorm``,
    ``layers.i.mlp.{gate_up_proj,down_proj}``, ``final_norm``, ``output_layer`` (``hf_adapter`` maps
    them to and from HF names).

    Raises:
        ValueError: config errors (see ``ModelConfig.validate``) or ``vocab_size`` unset.
    """

    def __init__(self, config, *, device=None):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        config.validate(tp)
        if config.vocab_size is None:
            raise ValueError("--vocab-size is not set: set it from the tokenizer (its vocabulary size) "
                             "before building LlamaModel")
        device = resolve_device(device)
        self.config = config
        self.vocab_size = config.vocab_size
        self.padded_vocab_size = config.padded_vocab_size(tp)
        dtype, h = config.torch_dtype, config.hidden_size
        self.sequence_parallel = bool(config.sequence_parallel) and tp > 1
        self.embedding = VocabParallelEmbedding(self.padded_vocab_size, h, num_real_embeddings=self.vocab_size,
                                                init_std=config.init_method_std, params_dtype=dtype, device=device,
                                                reduce_scatter_embeddings=self.sequence_parallel)
        self.layers = torch.nn.ModuleList(TransformerLayer(config, device=device) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(h, config.norm_epsilon, params_dtype=dtype, device=device,
                                  sequence_parallel=self.sequence_parallel)
        if config.tie_word_embeddings:
            self.output_layer = None
        else:
            self.output_layer = ColumnParallelLinear(h, self.padded_vocab_size, real_output_size=self.vocab_size,
                                                     init_std=config.init_method_std, params_dtype=dtype,
                                                     device=device, copy_input=False)
        from megatron_lite.model.rope import RotaryEmbedding

        with torch.device("cpu"):  # fp32 frequencies; tiny, so built on CPU even for meta models
            self.rotary_emb = RotaryEmbedding(config)
        if device.type != "meta":
            self.rotary_emb.to(device)
        self._backend: dict = {}
        # load_state_dict(..., assign=True) (the way to fill a meta-device model without paying for
        # init) swaps in new Parameter objects; re-mark them so grad norms still see the TP layout.
        self._tp_attrs = {n: (p.tensor_model_parallel, p.partition_dim, getattr(p, "partition_sizes", None),
                              getattr(p, "sequence_parallel", False))
                          for n, p in self.named_parameters()}
        self.register_load_state_dict_post_hook(LlamaModel._restore_tp_attributes)

    @staticmethod
    def _restore_tp_attributes(module, incompatible_keys) -> None:
        for name, p in module.named_parameters():
            if name in module._tp_attrs and not hasattr(p, "tensor_model_parallel"):
                is_parallel, dim, sizes, seq_parallel = module._tp_attrs[name]
                set_tensor_model_parallel_attributes(p, is_parallel, dim)
                p.partition_sizes = sizes
                p.sequence_parallel = seq_parallel

    def _attention_backend(self, x: torch.Tensor) -> str:
        key = (x.device.type, x.dtype)
        if key not in self._backend:
            from megatron_lite.model.attention import resolve_attention_backend

            self._backend[key] = resolve_attention_backend(self.config.attention_backend, x.device, x.dtype)
        return self._backend[key]

    def _num_recomputed_layers(self) -> int:
        if self.config.recompute_granularity != "full" or not self.training or not torch.is_grad_enabled():
            return 0
        n = self.config.recompute_num_layers
        return len(self.layers) if n is None else n

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Run the decoder.

        Args:
            tokens: ``[b, s]`` int64 ids in ``[0, vocab_size)``.
            position_ids: ``[b, s]`` int64 RoPE positions (reset at document starts in packed
                samples); None: ``0..s-1`` on every row.
            cu_seqlens: ``[n+1]`` int32 document boundaries in the flattened ``b*s`` stream, or None
                (one causal segment per row).
            max_seqlen: longest segment in tokens (flash backend), or None.
            labels: ``[b, s]`` int64 targets (``-100`` ignored), or None.

        With context parallelism tokens, position_ids and labels are this CP rank's ``s / CP``
        tokens (``parallel.context_parallel.split_batch_for_context_parallel``) and cu_seqlens
        the whole sequence's boundaries; attention is ring attention over the CP group.

        Returns:
            Without labels: fp32 logits ``[b, s, V_pad/TP]`` (padded columns at the fp32 minimum).
            With labels: fp32 per-token loss ``[b, s]`` (0 where the label is -100).

        Sequence parallelism with s not divisible by TP (generation, odd evaluation lengths): each
        row is padded at its end to the next multiple of TP (token 0, position 0, label -100) and
        the outputs cut back to s. Attention is causal, so no real position sees the padding and
        the results are the unpadded model's; position 0 keeps ``max(position_ids)`` (dynamic
        RoPE) unchanged. Packed samples (``cu_seqlens``) must have s divisible by TP.

        Raises:
            ValueError: bad shapes, a label outside ``[0, vocab_size)``, packed samples whose
                length is not divisible by TP under sequence parallelism.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [b, s], got shape {tuple(tokens.shape)}")
        b, s = tokens.shape
        if position_ids is None:  # with CP the global positions of this rank's chunks
            position_ids = local_token_positions(s, device=tokens.device).unsqueeze(0).expand(b, s)
        elif position_ids.shape != tokens.shape:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} must match tokens {tuple(tokens.shape)}")
        sp = self.sequence_parallel
        if sp and s % get_tensor_model_parallel_world_size():
            return self._forward_padded(tokens, position_ids, cu_seqlens, labels)
        h = self.embedding(tokens)  # [b, s/TP, H] with sequence parallelism
        if self.training and self.config.hidden_dropout > 0.0:
            # SP: each rank holds other tokens, so the masks come from the per-rank stream
            with get_rng_tracker().fork() if sp else contextlib.nullcontext():
                h = F.dropout(h, self.config.hidden_dropout, True)
        cos, sin = self.rotary_emb(position_ids)  # whole sequence: attention runs on gathered q/k/v
        backend = self._attention_backend(h)
        n_recompute = self._num_recomputed_layers()
        for i, layer in enumerate(self.layers):
            if i < n_recompute:
                h = checkpoint(layer, h, cos, sin, cu_seqlens, max_seqlen, backend, use_reentrant=False,
                               context_fn=recompute_rng_context)
            else:
                h = layer(h, cos, sin, cu_seqlens, max_seqlen, backend)
        h = self.final_norm(h)
        if sp:  # Megatron's order: norm on [b, s/TP, H], then gather; backward reduce-scatters
            h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True)
        weight = self.embedding.weight if self.output_layer is None else self.output_layer.weight
        if labels is None:
            return parallel_lm_logits(h, weight, self.vocab_size, copy_input=not sp)
        # --cross-entropy-impl: fused (full fp32 logits) or chunked (none of full size)
        return lm_head_cross_entropy(h, weight, labels, vocab_size=self.vocab_size,
                                     impl=self.config.cross_entropy_impl,
                                     chunk_size=self.config.cross_entropy_chunk_size, copy_input=not sp)

    def _forward_padded(self, tokens, position_ids, cu_seqlens, labels) -> torch.Tensor:
        """Sequence parallelism, s % TP != 0: pad every row's end to a multiple of TP, run, cut back."""
        s = tokens.shape[1]
        if cu_seqlens is not None:
            raise ValueError(f"sequence parallelism: packed samples (cu_seqlens) of length {s} must be "
                             f"divisible by --tensor-model-parallel-size {get_tensor_model_parallel_world_size()}")
        pad = -s % get_tensor_model_parallel_world_size()
        out = self.forward(F.pad(tokens, (0, pad)), F.pad(position_ids, (0, pad)), None, None,
                           None if labels is None else F.pad(labels, (0, pad), value=-100))
        return out[:, :s]
