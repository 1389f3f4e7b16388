#!/usr/bin/env python
"""Convert checkpoints between megatron_lite (any TP degree), HuggingFace LlamaForCausalLM folders
and DeepSpeed ZeRO training checkpoints.

Examples::

    # ours (any TP) -> HF folder that transformers.AutoModelForCausalLM.from_pretrained loads
    python tools/convert_checkpoint.py --load-format megatron_lite --save-format hf \\
        --load runs/7b --save hf/7b --dtype bf16 --max-shard-size 5GB
    # HF -> ours at TP=8 (then: pretrain_llama.py --load ours/7b_tp8 --finetune <printed flags>)
    python tools/convert_checkpoint.py --load-format hf --save-format megatron_lite \\
        --load hf/llama-7b --save ours/7b_tp8 --target-tp 8
    # reshard ours TP=8 -> TP=2 (no HF folder in between)
    python tools/convert_checkpoint.py --load-format megatron_lite --save-format megatron_lite \\
        --load runs/7b --save runs/7b_tp2 --target-tp 2
    # ZeRO-2/3 training checkpoint -> plain one with the fp32 master weights
    python tools/convert_checkpoint.py --load-format deepspeed --save-format hf \\
        --load runs/7b --save hf/7b_fp32

Formats: ``megatron_lite`` is a --save folder of pretrain_llama.py (its latest complete checkpoint,
or --iteration N) or one iter_XXXXXXX folder; the weights read are the module weights training
saved (16-bit at bf16 training). ``deepspeed`` reads the same folders (or a raw DeepSpeed
engine.save_checkpoint folder of an HF LlamaForCausalLM, with config.json beside it) and takes the
fp32 master weights out of the ZeRO optimizer partitions (DeepSpeed's zero_to_fp32, per TP rank).
``hf`` is a folder with config.json and model.safetensors (or sharded with
model.safetensors.index.json, or pytorch_model.bin).

A megatron_lite output is weights-only (no optimizer/scheduler state): train from it with
--finetune (any ZeRO stage) and the model flags the converter prints.
Output goes to <save>.tmp_* and is renamed into place when complete; on any error nothing is left.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how
from megatron_lite.eval.tool_cli import ToolArgumentParser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ToolArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="input folder")
    p.add_argument("--save", required=True, help="output folder (must not exist or be empty, "
                   "unless --force)")
    p.add_argument("--load-format", required=True, choices=["megatron_lite", "hf", "deepspeed"],
                   help="format of --load")
    p.add_argument("--save-format", required=True, choices=["megatron_lite", "hf"],
                   help="format of --save")
    p.add_argument("--target-tp", type=int, default=None,
                   help="tensor-parallel degree of a megatron_lite output (default: the source's "
                   "TP, 1 for an HF source); the vocab is re-padded to a multiple of "
                   "--make-vocab-size-divisible-by x TP")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the written weights (default: keep the source's)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="HF output: largest safetensors file, e.g. 5GB (10^9 bytes), 500MB, 2GiB, "
                   "or a byte count; above it the weights are sharded with "
                   "model.safetensors.index.json (default: 5GB)")
    p.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model to ship with the output (default: the source's: the "
                   "run's --tokenizer-model, or tokenizer.model of an HF folder). HF output gets "
                   "tokenizer.model and, when transformers converts it offline to identical ids, "
                   "tokenizer.json + tokenizer_config.json")
    p.add_argument("--iteration", type=int, default=None,
                   help="megatron_lite/deepspeed input: read checkpoint iter_XXXXXXX (or "
                   "global_stepN) of that step instead of the latest")
    p.add_argument("--force", action="store_true",
                   help="replace an existing non-empty --save folder (only once the new one is "
                   "complete)")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Run the converter; returns ``megatron_lite.convert.convert``'s summary.

    Raises:
        SystemExit: bad flags or bad input, with the reason (exit code 2); nothing is written.
    """
    args = build_parser().parse_args(argv)
    from megatron_lite.convert import ConversionError, convert
    from megatron_lite.config.checks import output_path_problem

    try:
        # The output is staged in <save>.tmp_* beside --save: its folder must accept new entries.
        problem = output_path_problem(os.path.abspath(args.save).rstrip(os.sep) + ".tmp_", "dir")
        if problem:
            raise ConversionError(f"--save {args.save}: {problem}")
        res = convert(args.load, args.save, args.load_format, args.save_format,
                      target_tp=args.target_tp, dtype=args.dtype,
                      max_shard_size=args.max_shard_size, tokenizer_model=args.tokenizer_model,
                      iteration=args.iteration, force=args.force)
    except ConversionError as e:
        print(f"convert_checkpoint.py: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from e
    for note in res["notes"]:
        print(f"convert_checkpoint.py: note: {note}", flush=True)
    tp = f" at TP={res['tp']}" if res["tp"] else ""
    print(f"convert_checkpoint.py: {res['source']} -> {res['save']} ({args.save_format}{tp})",
          flush=True)
    return res


if __name__ == "__main__":
    from megatron_lite.eval.tool_cli import run_tool

    sys.exit(run_tool("convert_checkpoint.py", main))
