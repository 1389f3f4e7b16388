"""Model loading and calling for the inference tools (``tools/eval_ppl.py``, ``tools/generate.py``).

Two sources:
  * ``megatron_lite``: a ``--save`` folder (or one checkpoint folder), loaded TP-sharded by
    ``megatron_lite.checkpoint.weights.load_model_for_inference``;
  * ``hf``: a HuggingFace ``LlamaForCausalLM`` folder (config.json + safetensors), converted into
    our TP-sharded ``LlamaModel`` by ``megatron_lite.model.hf_adapter`` (any TP degree).

Whatever the source, callers get a :class:`LoadedModel` with ``loss(tokens, labels)`` (per-token
NLL ``[b, s]``, 0 at label -100, complete on every TP rank) and ``logits(tokens)`` (full-vocabulary
fp32 logits ``[b, s, V]``, gathered over the TP group and with the vocab padding cut off).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_lite import parallel
from megatron_lite.checkpoint.hf_files import read_hf_weights
from megatron_lite.checkpoint.layout import find_checkpoint
from megatron_lite.checkpoint.weights import load_model_for_inference
from megatron_lite.convert.hf_io import read_hf_config
from megatron_lite.model.hf_adapter import config_from_hf, hf_to_megatron_lite
from megatron_lite.model.llama import LlamaModel

LOAD_FORMATS = ("megatron_lite", "hf")


@dataclasses.dataclass
class LoadedModel:
    """A model ready for inference on this rank.

    Attributes:
        module: ``LlamaModel`` (our TP shard) or ``transformers.LlamaForCausalLM``.
        kind: ``"ours"`` or ``"hf"`` (which calling convention ``module`` follows).
        vocab_size: true vocabulary size V (logits beyond it are padding).
        seq_length: training sequence length of the checkpoint (default window), or None.
        run_config: the checkpoint's ``RunConfig`` (ours) or None.
        hf_folder: the HuggingFace folder (hf) or None; it may hold the tokenizer.
    """

    module: Any
    kind: str
    vocab_size: int
    seq_length: int | None
    run_config: Any = None
    hf_folder: str | None = None

    def extrapolation_warning(self, seq_length: int) -> str | None:
        """A warning when windows of ``seq_length`` tokens reach positions the model never
        trained at (beyond its ``seq_length``), else None. RoPE still produces those positions,
        but without a context extension (YaRN, Peng et al. 2023; position interpolation, Chen
        et al. 2023) the loss there rises sharply, so the perplexity is not the model's."""
        trained = self.seq_length
        if not trained or seq_length <= trained:
            return None
        cfg = getattr(self.module, "config", None)
        kind = getattr(cfg, "rope_scaling_type", "none") or "none"
        factor = getattr(cfg, "rope_scaling_factor", 1.0)
        how = "RoPE without scaling" if kind == "none" else \
            f"--rope-scaling-type {kind} x{factor:g} up to {trained}"
        return (f"--seq-length {seq_length} is longer than the {trained} positions the model was "
                f"trained at ({how}): positions {trained}..{seq_length - 1} are extrapolated and "
                f"the perplexity is not comparable with --seq-length <= {trained}; to evaluate a "
                "longer context, extend the model first (continued pretraining at that length "
                "with --rope-scaling-type yarn/linear/llama3 and --rope-scaling-factor)")

    @torch.no_grad()
    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token NLL in nats ``[b, s]`` fp32 for ``tokens [b, s]``, ``labels [b, s]``."""
        if self.kind == "ours":
            return self.module(tokens, labels=labels)
        logits = self.module(input_ids=tokens).logits.float()
        return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                               reduction="none")

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary fp32 logits ``[b, s, V]`` (identical on every TP rank)."""
        if self.kind == "hf":
            return self.module(input_ids=tokens).logits.float()[..., :self.vocab_size]
        local = self.module(tokens)  # [b, s, V_pad / TP]
        if parallel.get_tensor_model_parallel_world_size() > 1:
            local = parallel.gather_from_tensor_model_parallel_region(local)
        return local[..., :self.vocab_size].float()


def init_distributed(tp: int, device: torch.device) -> bool:
    """Start torch.distributed from torchrun's environment and build the TP/DP groups.

    Without ``WORLD_SIZE`` in the environment (plain ``python tools/...``) nothing is started
    and ``tp`` must be 1. A process group or TP groups that already exist (the tools called from
    Python) are used as they are.

    Returns:
        True when this call created the process group (the caller then tears it down with
        :func:`shutdown_distributed`).

    Raises:
        ValueError: ``--tp`` > 1 without torchrun, a world size not divisible by ``--tp``, or
            existing TP groups of another degree.
    """
    created = False
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            if tp != 1:
                raise ValueError(f"--tp {tp} needs {tp} processes: launch with "
                                 f"torchrun --nproc_per_node {tp} ...")
            return False
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    try:
        if not parallel.model_parallel_is_initialized():
            parallel.initialize_model_parallel(tp)
        elif parallel.get_tensor_model_parallel_world_size() != tp:
            raise ValueError(f"--tp {tp}, but TP groups of size "
                             f"{parallel.get_tensor_model_parallel_world_size()} already exist")
    except BaseException:
        if created:  # a refused --tp leaves no process group behind
            dist.destroy_process_group()
        raise
    return created


def shutdown_distributed(created: bool) -> None:
    """Undo :func:`init_distributed` when it created the process group."""
    if created:
        parallel.destroy_model_parallel()
        dist.destroy_process_group()


@contextlib.contextmanager
def inference_session(tp: int, device_name: str | None) -> Iterator[torch.device]:
    """The inference tools' common frame: pick the device, turn autograd off, build the TP/DP
    groups (:func:`init_distributed`); on the way out undo both, so a caller that runs a tool's
    ``main()`` in its own process (tests, notebooks) gets its state back.

    Yields:
        the ``torch.device`` to load onto (``--device``, default CUDA when available).
    """
    device = pick_device(device_name)
    created = init_distributed(tp, device)  # may refuse --tp: nothing to undo yet
    grad_was_enabled = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        yield device
    finally:
        shutdown_distributed(created)
        torch.set_grad_enabled(grad_was_enabled)


def _load_ours(load: str, device: torch.device, flag: str = "--load") -> LoadedModel:
    """Our checkpoint at ``load`` as this rank's TP shard (any TP degree)."""
    if not os.path.exists(load):
        raise FileNotFoundError(f"{flag} {load}: no such file or folder")
    try:
        model, cfg = load_model_for_inference(load, parallel.get_tensor_model_parallel_rank(),
                                              parallel.get_tensor_model_parallel_world_size())
    except FileNotFoundError as e:
        if os.path.isfile(os.path.join(load, "config.json")):
            raise FileNotFoundError(f"{flag} {load}: no megatron_lite checkpoint there (no "
                                    "manifest.json) but a config.json: for a HuggingFace folder "
                                    f"pass {flag}-format hf") from None
        raise FileNotFoundError(f"{flag} {e}") from None
    return LoadedModel(model.to(device).eval(), "ours", cfg.model.vocab_size,
                       cfg.model.seq_length, run_config=cfg)


def _load_hf(folder: str, device: torch.device, flag: str = "--load") -> LoadedModel:
    """An HF LlamaForCausalLM folder converted into this rank's LlamaModel TP shard."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path) and find_checkpoint(folder) is not None:
        raise FileNotFoundError(f"{flag} {folder} {flag}-format hf: that is a megatron_lite "
                                f"checkpoint (no config.json); drop {flag}-format hf")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{flag} {folder} {flag}-format hf: no config.json there "
                                "(expected a HuggingFace LlamaForCausalLM folder)")
    model_cfg = config_from_hf(read_hf_config(folder))  # refuses non-LLaMA architectures
    tp, rank = parallel.get_tensor_model_parallel_world_size(), \
        parallel.get_tensor_model_parallel_rank()
    model_cfg.validate(tp)
    shard = hf_to_megatron_lite({k: v.float() for k, v in read_hf_weights(folder).items()},
                                model_cfg, rank, tp)
    model = LlamaModel(model_cfg, device="cpu")
    model.load_state_dict(shard)
    return LoadedModel(model.to(device).eval(), "ours", model_cfg.vocab_size,
                       model_cfg.seq_length, hf_folder=folder)


def load_model(load: str, load_format: str, device: torch.device,
               flag: str = "--load") -> LoadedModel:
    """Load a checkpoint for inference on this rank (after :func:`init_distributed`).

    Args:
        load: ``--load`` path.
        load_format: ``megatron_lite`` or ``hf``.
        device: where the weights go.
        flag: the tool's flag for ``load`` in messages (its format flag is ``<flag>-format``).

    Raises:
        ValueError: unknown ``--load-format``; TP mismatch with the checkpoint.
        FileNotFoundError: no checkpoint at ``load`` (an HF folder given as ours, or ours as
            HF, is named as such with the format flag to change).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"{flag}-format {load_format!r}: choose one of {LOAD_FORMATS}")
    if load_format == "hf":
        return _load_hf(load, device, flag)
    return _load_ours(load, device, flag)


def pick_device(name: str | None) -> torch.device:
    """``--device`` (default: CUDA when available, else CPU)."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
