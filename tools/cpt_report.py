#!/usr/bin/env python
"""Before/after report of continued pretraining: domain lift vs base retention, and long context.

Example::

    python tools/cpt_report.py --base hf_llama/ --cpt runs/cpt/ckpt \\
        --base-data data/base_heldout_text_document --domain-data data/domain_heldout_text_document \\
        --max-tokens 200000 --rope-scaling-type yarn --rope-scaling-factor 2 --json

Rows (each for the base and the CPT model, same token streams, same windows):

* ``base held-out``   - perplexity at the trained context L: retention (CPT should stay close);
* ``domain held-out`` - perplexity at L: lift (CPT should be lower);
* ``... @ F x L``     - sliding-window perplexity at ``F x L`` tokens (``--long-context-factor``,
  default 2; stride L) with the RoPE scaling set by ``--rope-scaling-type/--rope-scaling-factor``
  for the evaluation only: the pre-extension context is L (``--rope-scaling-original``), the
  model's max positions become ``F x L``. ``--long-context-factor 0`` skips these rows.

Every number is computed exactly as ``tools/eval_ppl.py`` computes it (same loading, stream and
windows: ``megatron_lite/eval/perplexity.py``), so a row equals ``eval_ppl.py --load X --data-path
P --seq-length L --stride S --max-tokens N`` (its default window convention: each window feeds L
tokens and scores up to L targets, not the HF guide's, see ``--window-convention`` there).
``change`` is ``cpt / base - 1``. Both models must
read the held-out sets with the same token ids (with an extended tokenizer, tokenise the held-out
sets with the extended one: the base model then cannot score the new ids and the tool says so).
With ``--json`` rank 0 prints one JSON object; ``--output FILE`` writes it atomically.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how
from megatron_lite.eval.tool_cli import ToolArgumentParser  # noqa: E402

SCALING = ["none", "linear", "ntk", "dynamic", "yarn", "llama3"]


def build_parser() -> argparse.ArgumentParser:
    p = ToolArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="base model: our checkpoint folder or HF folder")
    p.add_argument("--cpt", required=True, help="CPT model: our checkpoint folder or HF folder")
    p.add_argument("--base-format", default="auto", choices=["auto", "megatron_lite", "hf"],
                   help="format of the base model folder (auto: hf when it has config.json)")
    p.add_argument("--cpt-format", default="auto", choices=["auto", "megatron_lite", "hf"],
                   help="format of the CPT model folder (auto: hf when it has config.json)")
    p.add_argument("--base-data", required=True, help="held-out prefix of the base domain")
    p.add_argument("--domain-data", required=True, help="held-out prefix of the CPT domain")
    p.add_argument("--seq-length", type=int, default=None,
                   help="L, window in tokens (default: the CPT model's training --seq-length)")
    p.add_argument("--stride", type=int, default=None, help="stride at L (default: L, plain)")
    p.add_argument("--max-tokens", type=int, default=None, help="first N tokens of each stream")
    p.add_argument("--micro-batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--long-context-factor", type=int, default=2,
                   help="F: also evaluate at F x L with stride L (0: skip)")
    p.add_argument("--rope-scaling-type", default="none", choices=SCALING,
                   help="RoPE scaling used for the F x L rows only")
    p.add_argument("--rope-scaling-factor", type=float, default=None,
                   help="its factor (default: F)")
    p.add_argument("--rope-scaling-original", type=int, default=None,
                   help="pre-extension context for the scaling (default: L)")
    p.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1,
                   help="TP degree to evaluate at (run under torchrun with as many processes)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--output", default=None, help="also write the JSON report here (atomic)")
    return p


def _format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "hf" if os.path.isfile(os.path.join(path, "config.json")) else "megatron_lite"


def with_rope_scaling(loaded, kind: str, factor: float, original: int, max_positions: int):
    """A copy of ``loaded`` whose ``LlamaModel`` uses the given RoPE scaling (same weights).

    Args:
        loaded: a ``LoadedModel`` of kind ``"ours"``.
        kind, factor: ``--rope-scaling-type`` / ``--rope-scaling-factor``.
        original: pre-extension context in tokens (``rope_original_max_position_embeddings``).
        max_positions: new ``max_position_embeddings`` in tokens.
    """
    import dataclasses

    from megatron_lite.model.llama import LlamaModel

    old = loaded.module
    cfg = copy.deepcopy(old.config)
    cfg.rope_scaling_type, cfg.rope_scaling_factor = kind, float(factor)
    cfg.rope_original_max_position_embeddings = int(original)
    cfg.max_position_embeddings = max(int(max_positions), int(original))
    cfg.seq_length = min(cfg.seq_length, cfg.max_position_embeddings)
    device = next(old.parameters()).device
    new = LlamaModel(cfg, device="meta")
    new.load_state_dict(old.state_dict(), assign=True)
    new.rotary_emb.to(device)
    return dataclasses.replace(loaded, module=new.eval())


def evaluate(args) -> dict:
    """Compute every row (collective under torchrun). Returns the report dict."""
    import torch

    from megatron_lite import parallel
    from megatron_lite.data.indexed import IndexedDataset
    from megatron_lite.eval.loading import load_model, pick_device
    from megatron_lite.eval.perplexity import build_stream, stream_perplexity

    device = pick_device(args.device)
    models = {"base": load_model(args.base, _format(args.base, args.base_format), device,
                                 "--base"),
              "cpt": load_model(args.cpt, _format(args.cpt, args.cpt_format), device, "--cpt")}
    L = args.seq_length or models["cpt"].seq_length
    if not L:
        raise ValueError("the CPT checkpoint names no sequence length; pass --seq-length")
    streams = {"base held-out": build_stream(IndexedDataset(args.base_data), args.max_tokens),
               "domain held-out": build_stream(IndexedDataset(args.domain_data), args.max_tokens)}
    for name, stream in streams.items():
        for who, m in models.items():
            if int(stream.max()) >= m.vocab_size:
                raise ValueError(f"{name} data holds token id {int(stream.max())} but the {who} "
                                 f"model has {m.vocab_size} entries: tokenise both held-out sets "
                                 "with a tokenizer both models share")
    dp = dict(dp_rank=parallel.get_data_parallel_rank(),
              dp_size=parallel.get_data_parallel_world_size(),
              dp_group=parallel.get_data_parallel_group(), device=device)
    rows = []

    def row(label, ctx, stride, variants):
        r = {"set": label, "seq_length": ctx, "stride": stride or ctx}
        for who, m in variants.items():
            res = stream_perplexity(m.loss, streams[label.split(" @")[0]], ctx, stride,
                                    micro_batch_size=args.micro_batch_size, **dp)
            r[who] = res
        r["change"] = r["cpt"]["ppl"] / r["base"]["ppl"] - 1.0
        rows.append(r)

    with torch.no_grad():
        for label in streams:
            row(label, L, args.stride, models)
        F = args.long_context_factor
        if F and F > 1:
            factor = args.rope_scaling_factor or float(F)
            orig = args.rope_scaling_original or L
            scaled = {who: with_rope_scaling(m, args.rope_scaling_type, factor, orig, F * L)
                      if args.rope_scaling_type != "none" else m for who, m in models.items()}
            for label in streams:
                row(f"{label} @ {F}xL", F * L, L, scaled)
    return {"base": args.base, "cpt": args.cpt, "seq_length": L, "max_tokens": args.max_tokens,
            "long_context": {"factor": args.long_context_factor,
                             "rope_scaling_type": args.rope_scaling_type,
                             "rope_scaling_factor": args.rope_scaling_factor
                             or float(args.long_context_factor),
                             "rope_scaling_original": args.rope_scaling_original or L},
            "rows": rows}


def format_table(report: dict) -> str:
    """The report as a Markdown table (ppl to 3 decimals, change in %)."""
    lines = ["| set | context | base ppl | CPT ppl | change |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        ctx = f"{r['seq_length']} (stride {r['stride']})"
        lines.append(f"| {r['set']} | {ctx} | {r['base']['ppl']:.3f} | {r['cpt']['ppl']:.3f} | "
                     f"{100 * r['change']:+.1f} % |")
    lc = report["long_context"]
    if lc["factor"] and lc["factor"] > 1:
        lines.append(f"\nF x L rows: RoPE scaling {lc['rope_scaling_type']} x "
                     f"{lc['rope_scaling_factor']:g} from {lc['rope_scaling_original']} tokens "
                     "(evaluation only).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Build, print and optionally write the report; returns it.

    Raises:
        ValueError, FileNotFoundError: bad flags, checkpoints or data (``tools/cpt_report.py``
            prints them as one line, exit 2).
    """
    args = build_parser().parse_args(argv)
    import torch.distributed as dist

    from megatron_lite.eval.loading import inference_session
    from megatron_lite.config.checks import check_output_path

    if args.output:
        check_output_path("--output", args.output, "file")  # before the evaluations, not after
    with inference_session(args.tp, args.device):
        report = evaluate(args)
        if not dist.is_initialized() or dist.get_rank() == 0:
            text = json.dumps(report)
            if args.output:
                tmp = f"{args.output}.tmp-{os.getpid()}"
                with open(tmp, "w") as f:
                    f.write(text + "\n")
                os.replace(tmp, args.output)
            print(text if args.json else format_table(report), flush=True)
        return report


if __name__ == "__main__":
    from megatron_lite.eval.tool_cli import run_tool

    sys.exit(run_tool("cpt_report.py", main))
