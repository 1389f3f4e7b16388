#!/usr/bin/env python
"""Generate text from a checkpoint with a prompt (greedy or top-p sampling), for sanity checks.

Examples::

    python tools/generate.py --load runs/quickstart/ckpt --prompt "def main(" --greedy
    torchrun --nproc_per_node 2 tools/generate.py --tp 2 --load runs/quickstart/ckpt \\
        --prompt "import os" --top-p 0.9 --temperature 0.8 --seed 1
    python tools/generate.py --load-format hf --load hf_llama/ --prompt "Hello"

The tokenizer is the one recorded in the checkpoint's config (``--tokenizer-type`` /
``--tokenizer-model`` at training time); for HuggingFace folders the folder's ``tokenizer.json``.
``--tokenizer-model`` overrides either. Generation stops at the end-of-document token unless
``--no-stop-at-eod``. Rank 0 prints the prompt followed by the generated text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how
from megatron_lite.eval.tool_cli import ToolArgumentParser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ToolArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="our --save folder / checkpoint folder, or a "
                   "HuggingFace folder with --load-format hf")
    p.add_argument("--load-format", default="megatron_lite", choices=["megatron_lite", "hf"],
                   help="--load is our checkpoint folder or a HuggingFace LlamaForCausalLM folder")
    p.add_argument("--prompt", required=True, help="text to continue (may be empty with "
                   "--add-bos: generate from the BOS token alone)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (>= 0; "
                   "0 means greedy, as in the OpenAI API and vLLM)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed")
    p.add_argument("--no-stop-at-eod", action="store_true",
                   help="keep generating past the end-of-document token")
    p.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS id")
    p.add_argument("--tokenizer-type", default=None,
                   choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"],
                   help="tokenizer kind (default: the checkpoint's, or SentencePiece)")
    p.add_argument("--tokenizer-model", default=None, help="override the checkpoint's tokenizer")
    p.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1,
                   help="TP degree to generate at (run under torchrun with as many processes)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", action="store_true",
                   help='print {"prompt", "text", "prompt_ids", "new_ids"} as JSON')
    return p


def _tokenizer(args, loaded):
    from megatron_lite.data.tokenizer import build_tokenizer

    ttype, tmodel = args.tokenizer_type, args.tokenizer_model
    if tmodel is None and loaded.run_config is not None:  # ours: the run's data section
        tmodel = loaded.run_config.data.tokenizer_model
        ttype = ttype or loaded.run_config.data.tokenizer_type
    if tmodel is None and loaded.hf_folder and \
            os.path.isfile(os.path.join(loaded.hf_folder, "tokenizer.json")):
        tmodel, ttype = loaded.hf_folder, ttype or "HuggingFaceTokenizer"
    if tmodel is None:
        raise ValueError("the checkpoint records no tokenizer; pass --tokenizer-model "
                         "(and --tokenizer-type)")
    if ttype is None:
        ttype = "SentencePieceTokenizer" if tmodel.endswith(".model") else "HuggingFaceTokenizer"
    return build_tokenizer(ttype, tmodel)


EMPTY_PROMPT = ("--prompt is empty (no tokens to continue): give some text, or pass --add-bos to "
                "generate from the BOS token alone")


def check_args(args: argparse.Namespace) -> None:
    """Sampling flags checked before the model is loaded; ``--temperature 0`` becomes greedy.

    Raises:
        ValueError: naming the flag and the valid range.
    """
    if not args.prompt and not args.add_bos:
        raise ValueError(EMPTY_PROMPT)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    if not args.temperature >= 0:  # also refuses NaN
        raise ValueError(f"--temperature must be >= 0 (got {args.temperature}); 0 means greedy")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (got {args.top_p}); 1 keeps every token")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (got {args.top_k}); 0 turns it off")
    if args.temperature == 0:
        args.greedy = True


def main(argv: list[str] | None = None) -> dict:
    """Generate; returns ``{"prompt", "text", "prompt_ids", "new_ids"}``.

    Raises:
        ValueError, FileNotFoundError: bad flags or checkpoint (``tools/generate.py`` prints
            them as one line, exit 2).
    """
    args = build_parser().parse_args(argv)
    check_args(args)
    import torch
    import torch.distributed as dist

    from megatron_lite.eval.generation import generate
    from megatron_lite.eval.loading import inference_session, load_model

    with inference_session(args.tp, args.device) as device:
        loaded = load_model(args.load, args.load_format, device)
        tok = _tokenizer(args, loaded)
        prompt_ids = tok.encode(args.prompt)
        if args.add_bos:
            if tok.bos is None:
                raise ValueError("--add-bos but the tokenizer has no BOS token")
            prompt_ids = [tok.bos] + prompt_ids
        if not prompt_ids:
            raise ValueError(EMPTY_PROMPT)
        gen = torch.Generator().manual_seed(args.seed)
        new = generate(loaded.logits, prompt_ids, args.max_new_tokens, greedy=args.greedy,
                       temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                       eod=None if args.no_stop_at_eod else tok.eod,
                       max_context=loaded.seq_length, generator=gen, device=device)
        shown = [t for t in new if t != tok.eod]
        result = {"prompt": args.prompt, "text": tok.decode(shown), "prompt_ids": prompt_ids,
                  "new_ids": new}
        if (dist.get_rank() if dist.is_initialized() else 0) == 0:
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                mode = "greedy" if args.greedy else (f"top-p {args.top_p}, temperature "
                                                    f"{args.temperature}, seed {args.seed}")
                print(f"--- prompt ({mode}) ---\n{args.prompt}\n--- continuation "
                      f"({len(new)} tokens) ---\n{result['text']}", flush=True)
        return result


if __name__ == "__main__":
    from megatron_lite.eval.tool_cli import run_tool

    sys.exit(run_tool("generate.py", main))
