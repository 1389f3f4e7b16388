"""Continued pretraining (cpt_llama.py): config from the base checkpoint, weight loading, freezing,
vocabulary growth, resume.

Base checkpoints are made locally: a tiny random HF ``LlamaForCausalLM`` (transformers, saved as
safetensors with the tiny SentencePiece tokenizer) and, from it, one of ours at TP=2. The
end-to-end runs share ONE ``torchrun --nproc_per_node 2`` launch (this file run as a script).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.dist_utils import run_torchrun
from tests.fixtures_data import TINY_VOCAB_SIZE, load_tool, make_tiny_corpus_and_tokenizer

DOMAIN_WORDS = ("photosynthesis chlorophyll mitochondria ribosome enzyme substrate catalysis "
                "membrane protein nucleotide").split()
COMMON = ["--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "4",
          "--split", "100,0,0", "--num-workers", "0", "--log-interval", "1",
          "--eval-interval", "0", "--seed", "7", "--device", "cpu", "--lr", "3e-3",
          "--lr-warmup-iters", "1"]


# ----------------------------------------------------------------------------- fixtures
def make_domain_corpus(path: str, n: int = 300, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            words = rng.choice(DOMAIN_WORDS, size=int(rng.integers(5, 30)))
            f.write(json.dumps({"text": " ".join(words)}) + "\n")


def make_hf_base(folder: str, tokenizer: str, vocab: int = TINY_VOCAB_SIZE,
                 tied: bool = False) -> None:
    """A random tiny HF LlamaForCausalLM (GQA, vocab not a multiple of 128*TP when asked)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    rms_norm_eps=1e-5, tie_word_embeddings=tied)
    LlamaForCausalLM(c).save_pretrained(folder)
    shutil.copy(tokenizer, os.path.join(folder, "tokenizer.model"))


def hf_tensors(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tokenizers (base + extended), the HF base, token datasets: built once per module."""
    root = str(tmp_path_factory.mktemp("cpt"))
    _, base_tok = make_tiny_corpus_and_tokenizer(os.path.join(root, "tok"))
    domain = os.path.join(root, "domain.jsonl")
    make_domain_corpus(domain)
    ext = os.path.join(root, "ext")
    assert load_tool("extend_tokenizer").main([
        "--base-model", base_tok, "--input", domain, "--num-new-pieces", "40",
        "--output-prefix", ext, "--num-threads", "1"]) == 0
    hf = os.path.join(root, "hf")
    make_hf_base(hf, base_tok)
    from tests.test_training import make_dataset

    make_dataset(os.path.join(root, "base"))
    make_dataset(os.path.join(root, "domain"))
    return {"root": root, "base_tok": base_tok, "ext_tok": ext + ".model", "hf": hf}


def _resolve(argv):
    from megatron_lite.cpt.resolve import resolve_config

    return resolve_config(argv, world_size=1)


# ----------------------------------------------------------------------------- config
def test_architecture_comes_from_base_and_overrides_allowed(assets):
    cfg = _resolve(["--pretrained-checkpoint", assets["hf"], "--train-iters", "2",
                    "--seq-length", "32", "--rope-scaling-type", "yarn",
                    "--rope-scaling-factor", "2", "--hidden-size", "64", "--rotary-base", "5e5"])
    m = cfg.model
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups,
            m.ffn_hidden_size, m.vocab_size, m.tie_word_embeddings) == (64, 2, 4, 2, 176, 512, False)
    assert (m.seq_length, m.max_position_embeddings, m.rope_scaling_type, m.rotary_base) == \
        (32, 128, "yarn", 5e5)                              # long-context CPT knobs may change
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.min_lr == pytest.approx(1e-5)  # CPT default
    assert cfg.cpt.base_vocab_size == 512 and cfg.cpt.base_format == "hf"
    assert cfg.derived.padded_vocab_size == 512


@pytest.mark.parametrize("flags,needles", [
    (["--hidden-size", "128"], ["--hidden-size 128", "hidden_size = 64"]),
    (["--num-query-groups", "4"], ["--num-query-groups 4", "num_query_groups = 2"]),
    (["--tie-word-embeddings"], ["--tie-word-embeddings True", "tie_word_embeddings = False"]),
    (["--model-size", "tiny"], ["--model-size 'tiny' sets hidden_size = 128", "= 64"]),
    (["--vocab-size", "300"], ["--vocab-size 300 is below", "512"]),
    (["--freeze-layers", "1-2"], ["--freeze-layers '1-2'", "num_layers = 2"]),
])
def test_contradicting_flag_is_a_clear_error(assets, flags, needles):
    from megatron_lite.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _resolve(["--pretrained-checkpoint", assets["hf"], "--train-iters", "2"] + flags)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_yaml_contradiction_names_file_and_line(assets, tmp_path):
    from megatron_lite.config import ConfigError

    y = tmp_path / "cpt.yaml"
    y.write_text("schedule:\n  train_iters: 2\nmodel:\n  num_layers: 4\n")
    with pytest.raises(ConfigError, match=r"cpt\.yaml:4 model\.num_layers 4 contradicts.*"
                                          r"num_layers = 2"):
        _resolve(["--config", str(y), "--pretrained-checkpoint", assets["hf"]])


def test_missing_or_bad_base_is_an_error(assets, tmp_path):
    from megatron_lite.config import ConfigError

    with pytest.raises(ConfigError, match="needs --pretrained-checkpoint"):
        _resolve(["--train-iters", "2"])
    with pytest.raises(ConfigError, match="neither a HuggingFace folder"):
        _resolve(["--pretrained-checkpoint", str(tmp_path), "--train-iters", "2"])


def test_tokenizer_that_does_not_extend_the_base_is_refused(assets, tmp_path):
    from megatron_lite.config import ConfigError

    other = str(tmp_path / "other")
    assert load_tool("train_tokenizer").main([
        "--input", os.path.join(assets["root"], "tok", "tiny.jsonl"), "--model-prefix", other,
        "--vocab-size", "600", "--num-threads", "1", "--character-coverage", "1.0"]) == 0
    with pytest.raises(ConfigError, match="does not extend the base tokenizer"):
        _resolve(["--pretrained-checkpoint", assets["hf"], "--train-iters", "2",
                  "--tokenizer-model", other + ".model"])


# ----------------------------------------------------------------------------- vocab growth
def _expected_rows(old: np.ndarray, ext_tok: str, base_tok: str, v0: int, v1: int,
                   mode: str) -> np.ndarray:
    """Independent reference: SentencePiece directly, numpy float64 means."""
    import sentencepiece as spm

    new, base = spm.SentencePieceProcessor(model_file=ext_tok), \
        spm.SentencePieceProcessor(model_file=base_tok)
    rows = []
    for i in range(v0, v1):
        ids = base.encode(new.id_to_piece(i).replace("\u2581", " ")) if mode == "piece-mean" else []
        rows.append(old.astype(np.float64)[ids].mean(0) if ids else
                    old.astype(np.float64).mean(0))
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("mode", ["piece-mean", "mean"])
def test_extended_vocab_rows_initialised_as_documented(assets, mode):
    from megatron_lite.cpt.model_setup import shard_for_this_run

    cfg = _resolve(["--pretrained-checkpoint", assets["hf"], "--train-iters", "2",
                    "--tokenizer-model", assets["ext_tok"], "--extended-vocab-init", mode])
    v0, v1 = 512, cfg.model.vocab_size
    assert v1 == 552 and cfg.derived.padded_vocab_size == 640
    shard, note = shard_for_this_run(cfg, 0, 1)
    hf = hf_tensors(assets["hf"])
    for ours, theirs in (("embedding.weight", "model.embed_tokens.weight"),
                         ("output_layer.weight", "lm_head.weight")):
        w, old = shard[ours], hf[theirs]
        assert torch.equal(w[:v0], old)                                     # base rows untouched
        exp = _expected_rows(old.numpy(), assets["ext_tok"], assets["base_tok"], v0, v1, mode)
        assert np.array_equal(w[v0:v1].numpy(), exp)                        # exact values
        assert torch.count_nonzero(w[v1:]) == 0                             # padding rows
    if mode == "piece-mean":   # the rows really differ per piece (not all the plain mean)
        assert not torch.equal(shard["embedding.weight"][v0], shard["embedding.weight"][v0 + 1])
    assert "512 -> 552" in note


def test_freeze_marks_exactly_the_named_parameters(assets):
    from megatron_lite.model.llama import LlamaModel
    from megatron_lite.cpt.model_setup import freeze

    cfg = _resolve(["--pretrained-checkpoint", assets["hf"], "--train-iters", "2",
                    "--freeze-embeddings", "--freeze-layers", "1"])
    model = LlamaModel(cfg.model)
    frozen = set(freeze(model, cfg))
    assert frozen == {n for n, _ in model.named_parameters()
                      if n == "embedding.weight" or n.startswith("layers.1.")}
    assert all(p.requires_grad == (n not in frozen) for n, p in model.named_parameters())


# ----------------------------------------------------------------------------- cluster example
def test_cpt_7b_example_dry_run_validates_against_the_base(tmp_path):
    """examples/cpt_7b.sh --dry-run runs cpt_llama.py for 64 ranks against a base's config.json
    (no weights needed); a base that contradicts configs/cpt_7b.yaml is refused."""
    from megatron_lite.model.model_config import ModelConfig
    from megatron_lite.model.hf_adapter import config_to_hf

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    gqa, mha = tmp_path / "gqa", tmp_path / "mha"
    config_to_hf(ModelConfig(model_size="7b", vocab_size=32000)).save_pretrained(gqa)
    config_to_hf(ModelConfig(model_size="7b", num_query_groups=32, vocab_size=32000)) \
        .save_pretrained(mha)
    script = os.path.join(root, "examples", "cpt_7b.sh")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PRETRAINED", None)
    p = subprocess.run(["bash", script, "--dry-run"], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "set PRETRAINED" in p.stderr
    p = subprocess.run(["bash", script, "--dry-run", "--freeze-embeddings"],
                       env=dict(env, PRETRAINED=str(gqa)), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "TP 8 x D 8" in p.stdout and "grad accumulation A     : 32" in p.stdout
    assert f"cpt: base {gqa} (hf, vocab 32000 -> 32000), freeze embeddings True" in p.stdout
    p = subprocess.run(["bash", script, "--dry-run"], env=dict(env, PRETRAINED=str(mha)),
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert "model.model_size '7b' sets num_query_groups = 8, contradicting" in p.stderr
    assert "num_query_groups = 32" in p.stderr


# ----------------------------------------------------------------------------- end to end
def runs_spec(a: dict, root: str) -> dict:
    """name -> (argv, checks) of every end-to-end run (order matters: later runs use earlier
    checkpoints)."""
    data = ["--data-path", "0.3", os.path.join(a["root"], "base"), "0.7",
            os.path.join(a["root"], "domain")]            # replay: 30 % base-domain data

    def r(*extra, base=a["hf"], iters=3, mf=None):
        return (["--pretrained-checkpoint", base, "--train-iters", str(iters)] + COMMON + data
                + ["--metrics-file", os.path.join(root, mf + ".jsonl")] + list(extra))

    ours = os.path.join(root, "ck_freeze")
    return {
        # ZeRO-3 (partitioned load), D=2, extended tokenizer: loaded weights equal the HF base
        # bitwise, the grown vocabulary rows are as documented.
        "z3ext": r("--zero-stage", "3", "--tokenizer-model", a["ext_tok"], iters=1, mf="z3ext"),
        # TP=2, frozen embedding and block 0: bitwise unchanged after 3 steps, others move.
        "freeze": r("--tp", "2", "--zero-stage", "1", "--freeze-embeddings", "--freeze-layers",
                    "0-0", "--save", ours, mf="freeze"),
        # Base = our TP=2 checkpoint, run at TP=1 x D=2; interrupted + resumed == uninterrupted.
        "full": r("--zero-stage", "1", base=ours, iters=4, mf="full"),
        "ra": r("--zero-stage", "1", "--save", os.path.join(root, "ck_res"), "--exit-interval",
                "2", base=ours, iters=4, mf="ra"),
        "rb": r("--zero-stage", "1", "--save", os.path.join(root, "ck_res"), "--load",
                os.path.join(root, "ck_res"), base=ours, iters=4, mf="rb"),
        # Base = that run (4 steps, ZeRO-1, D=2) with its AdamW moments.
        "opt": r("--zero-stage", "1", "--load-optimizer-state", "--save",
                 os.path.join(root, "ck_opt"), "--load", os.path.join(root, "ck_opt"),
                 base=os.path.join(root, "ck_res"), iters=1, mf="opt"),
    }


def _gathered(model) -> dict:
    params = dict(model.named_parameters())
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}
    return {n: p.detach().clone() for n, p in params.items()}


def _driver(root: str) -> None:
    """Body of the torchrun launch: every run of :func:`runs_spec` in one process group."""
    import copy

    import torch.distributed as dist

    from megatron_lite import parallel
    from megatron_lite.model.hf_adapter import hf_to_megatron_lite
    from megatron_lite.checkpoint.weights import load_model_for_inference
    from megatron_lite.cpt.resolve import resolve_config
    from megatron_lite.cpt.run import run

    with open(os.path.join(root, "assets.json")) as f:
        a = json.load(f)
    hf = {k: v.float() for k, v in hf_tensors(a["hf"]).items()}
    out: dict = {}
    for name, argv in runs_spec(a, root).items():
        cfg = resolve_config(argv)
        snap: dict = {}
        run(cfg, after_setup=lambda model, c: snap.update(_gathered(model)))
        tp_rank, tp = (parallel.get_tensor_model_parallel_rank(),
                       parallel.get_tensor_model_parallel_world_size())
        res = out[name] = {}
        if name in ("z3ext", "freeze"):   # 0 steps: loaded == the HF base's shard, bitwise
            base_model = copy.deepcopy(cfg.model)
            base_model.vocab_size = 512   # vocab rows of z3ext: checked against numpy below
            want = hf_to_megatron_lite(hf, base_model, tp_rank, tp)
            if name == "z3ext":
                res["embedding"] = snap["embedding.weight"].tolist()
                res["output_layer"] = snap["output_layer.weight"].tolist()
                want = {k: v for k, v in want.items() if k not in ("embedding.weight",
                                                                   "output_layer.weight")}
            res["setup_diff"] = sorted(n for n in want if not torch.equal(want[n], snap[n]))
            res["setup_keys"] = len(want)
        if name == "freeze":
            model, _ = load_model_for_inference(os.path.join(root, "ck_freeze"), tp_rank, tp)
            want = hf_to_megatron_lite(hf, copy.deepcopy(cfg.model), tp_rank, tp)
            after = dict(model.named_parameters())
            res["unchanged"] = sorted(n for n in want if torch.equal(want[n], after[n]))
            res["all"] = sorted(want)
    with open(os.path.join(root, f"results_{dist.get_rank()}.json"), "w") as f:
        json.dump(out, f)


@pytest.fixture(scope="module")
def e2e(assets):
    root = os.path.join(assets["root"], "e2e")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "assets.json"), "w") as f:
        json.dump(assets, f)
    stdout = run_torchrun(__file__, root)
    results = []
    for r in range(2):
        with open(os.path.join(root, f"results_{r}.json")) as f:
            results.append(json.load(f))
    return root, results, stdout


@pytest.mark.slow
def test_loaded_weights_equal_base_bitwise_zero3_and_tp2(e2e):
    _, results, _ = e2e
    for r in results:
        for name in ("z3ext", "freeze"):
            assert r[name]["setup_keys"] > 0 and r[name]["setup_diff"] == [], (name, r[name])


@pytest.mark.slow
def test_frozen_parameters_bitwise_unchanged_after_steps(e2e):
    _, results, out = e2e
    assert "frozen: " in out
    for r in results:   # each TP rank's shard
        res = r["freeze"]
        frozen = [n for n in res["all"] if n == "embedding.weight" or n.startswith("layers.0.")]
        assert set(res["unchanged"]) == set(frozen), res["unchanged"]


@pytest.mark.slow
def test_extended_rows_under_zero3(e2e, assets):
    _, results, _ = e2e
    hf = hf_tensors(assets["hf"])
    for key, theirs in (("embedding", "model.embed_tokens.weight"), ("output_layer", "lm_head.weight")):
        w = np.asarray(results[0]["z3ext"][key], dtype=np.float32)
        assert w.shape == (640, 64)
        assert np.array_equal(w[:512], hf[theirs].numpy())
        exp = _expected_rows(hf[theirs].numpy(), assets["ext_tok"], assets["base_tok"], 512, 552,
                             "piece-mean")
        assert np.array_equal(w[512:552], exp) and not w[552:].any()


@pytest.mark.slow
def test_resume_of_cpt_run_is_exact_and_skips_base_load(e2e):
    from tests.dist_utils import read_metrics

    root, _, out = e2e
    full = read_metrics(os.path.join(root, "full.jsonl"))
    ra, rb = read_metrics(os.path.join(root, "ra.jsonl")), read_metrics(os.path.join(root, "rb.jsonl"))
    assert sorted(ra) == [1, 2] and sorted(rb) == [3, 4]
    for s in (1, 2):
        assert ra[s]["loss"] == full[s]["loss"]
    for s in (3, 4):
        assert rb[s]["loss"] == full[s]["loss"] and rb[s]["lr"] == full[s]["lr"]
    assert "resuming this run's checkpoint: base weights not read" in out


def _adam_steps(folder: str) -> set:
    sd = torch.load(os.path.join(folder, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                    map_location="cpu", weights_only=False)
    return {int(v["step"]) for v in
            sd["optimizer_state_dict"]["base_optimizer_state"]["state"].values()}


@pytest.mark.slow
def test_load_optimizer_state_continues_the_base_moments(e2e):
    root, _, out = e2e
    assert _adam_steps(os.path.join(root, "ck_res", "iter_0000004")) == {4}
    ck = os.path.join(root, "ck_opt", "iter_0000001")
    assert _adam_steps(ck) == {5}     # 4 base steps + 1 (fresh moments would say 1)
    with open(os.path.join(ck, "trainer_state.json")) as f:
        assert json.load(f)["iteration"] == 1          # counters and schedule start fresh
    assert "AdamW state of the base loaded" in out
    from megatron_lite.config import ConfigError

    with pytest.raises(ConfigError, match=r"saved with TP, ZeRO stage, D, vocab = \(1, 1, 2, 512\)"
                                          r", this run has \(1, 2, 1, 512\)"):
        _resolve(["--pretrained-checkpoint", os.path.join(root, "ck_res"), "--train-iters", "2",
                  "--load-optimizer-state", "--load", "x", "--zero-stage", "2"])


def test_load_optimizer_state_needs_a_matching_megatron_lite_base(assets):
    from megatron_lite.config import ConfigError

    with pytest.raises(ConfigError, match="--load-optimizer-state: the base .* is a HuggingFace"):
        _resolve(["--pretrained-checkpoint", assets["hf"], "--train-iters", "2",
                  "--load-optimizer-state", "--load", "x"])


@pytest.mark.slow
def test_cpt_report_equals_eval_ppl_and_hf_yarn(e2e, assets):
    """Rows at L equal tools/eval_ppl.py's numbers exactly; the 2L row with YaRN x2 equals HF
    transformers' LlamaForCausalLM with the same rope_parameters on the same windows."""
    import torch.nn.functional as F
    from transformers import AutoConfig, LlamaForCausalLM

    from megatron_lite.data.indexed import IndexedDataset
    from megatron_lite.eval.perplexity import build_stream, stream_perplexity

    root, _, _ = e2e
    ours = os.path.join(root, "ck_freeze")
    prefixes = {"base held-out": os.path.join(assets["root"], "base"),
                "domain held-out": os.path.join(assets["root"], "domain")}
    out = os.path.join(root, "report.json")
    report = load_tool("cpt_report").main([
        "--base", assets["hf"], "--cpt", ours, "--base-data", prefixes["base held-out"],
        "--domain-data", prefixes["domain held-out"], "--seq-length", "32", "--max-tokens", "500",
        "--rope-scaling-type", "yarn", "--rope-scaling-factor", "2", "--json", "--output", out])
    with open(out) as f:
        assert json.load(f) == report
    rows = {r["set"]: r for r in report["rows"]}
    assert sorted(rows) == ["base held-out", "base held-out @ 2xL", "domain held-out",
                            "domain held-out @ 2xL"]
    eval_ppl = load_tool("eval_ppl")
    for label, prefix in prefixes.items():
        for who, path, fmt in (("base", assets["hf"], "hf"), ("cpt", ours, "megatron_lite")):
            want = eval_ppl.main(["--load", path, "--load-format", fmt, "--data-path", prefix,
                                  "--seq-length", "32", "--max-tokens", "500"])
            assert rows[label][who] == want, (label, who)
        assert rows[label]["change"] == rows[label]["cpt"]["ppl"] / rows[label]["base"]["ppl"] - 1
    # Independent long-context reference: HF's YaRN (original 32 tokens, factor 2) at 64 tokens.
    hf_cfg = AutoConfig.from_pretrained(assets["hf"])
    hf_cfg.rope_parameters = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                              "original_max_position_embeddings": 32}
    hf_cfg.max_position_embeddings = 64
    model = LlamaForCausalLM.from_pretrained(assets["hf"], config=hf_cfg).eval()

    def loss(t, lab):
        logits = model(input_ids=t).logits.float()
        return F.cross_entropy(logits.transpose(1, 2), lab, ignore_index=-100, reduction="none")

    stream = build_stream(IndexedDataset(prefixes["domain held-out"]), 500)
    with torch.no_grad():
        ref = stream_perplexity(loss, stream, 64, 32, micro_batch_size=4)
    got = rows["domain held-out @ 2xL"]["base"]
    assert got["tokens"] == ref["tokens"] == 499
    assert got["nll"] == pytest.approx(ref["nll"], rel=1e-5)


if __name__ == "__main__":
    _driver(sys.argv[1])
