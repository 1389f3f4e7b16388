"""tools/convert_checkpoint.py: HF <-> megatron_lite at any TP, TP resharding, DeepSpeed ZeRO
consolidation, bad input.

Tiny HF models are made locally with ``transformers.LlamaConfig``/``LlamaForCausalLM`` (no hub).
The training-side checks (ZeRO-2 bf16 and ZeRO-3 TP=2 checkpoints, ``--finetune`` from a converted
checkpoint, a raw DeepSpeed checkpoint of an HF model) share ONE torchrun launch (this file run as
a script, 2 processes, gloo): the module fixture ``launch``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from tests.fixtures_data import load_tool, tiny_corpus_and_tokenizer  # noqa: F401
from tests.dist_utils import run_torchrun
from tests.test_training import make_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
V_ODD = 300  # not a multiple of 128 * TP: padded to 384 (TP=1), 512 (TP=2 and TP=4)


def _hf_model(folder, *, vocab=V_ODD, heads=4, groups=2, tied=False, rope=None, seed=0):
    """Save a random tiny LlamaForCausalLM to ``folder``; returns the model (eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = {"rope_parameters": rope} if rope else {}
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=groups,
                      max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=tied, **kw)
    m = LlamaForCausalLM(cfg).eval()
    m.save_pretrained(str(folder))
    return m


def _convert(*argv):
    return load_tool("convert_checkpoint").main([str(a) for a in argv])


def _hf_tensors(folder) -> dict:
    from megatron_lite.convert.hf_io import read_hf_state_dict

    return read_hf_state_dict(str(folder))


def _tokens(vocab=V_ODD, b=2, s=24, seed=5):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _ours_logits(folder, tokens, vocab=V_ODD):
    from megatron_lite.checkpoint.weights import load_model_for_inference

    model, cfg = load_model_for_inference(str(folder), 0, 1)
    return model(tokens)[..., :vocab].float(), cfg


@torch.no_grad()
def _hf_logits(folder, tokens):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    return m(input_ids=tokens).logits.float(), m


# ----------------------------------------------------------------------------- HF <-> ours
@pytest.mark.parametrize("tied", [False, True])
def test_hf_to_ours_tp2_to_hf_bitwise(tmp_path, tied):
    ref = _hf_model(tmp_path / "hf0", tied=tied)
    _convert("--load-format", "hf", "--save-format", "megatron_lite", "--load", tmp_path / "hf0",
             "--save", tmp_path / "ours2", "--target-tp", 2)
    ck = tmp_path / "ours2" / "iter_0000000"
    assert (tmp_path / "ours2" / "latest").read_text().strip() == "iter_0000000"
    a = _hf_tensors(tmp_path / "hf0")
    d = 16  # head dim = 64 / 4
    for r in range(2):   # the per-rank layout, derived by hand from the HF tensors
        sd = torch.load(ck / f"mp_rank_{r:02d}_model_states.pt", weights_only=False)["module"]
        emb = sd["embedding.weight"]
        assert emb.shape == (256, 64)       # V_pad(TP=2) = 512 = 2 * 256 rows per rank
        padded = torch.cat([a["model.embed_tokens.weight"], torch.zeros(512 - V_ODD, 64)])
        assert torch.equal(emb, padded[256 * r:256 * (r + 1)])
        q, k, v = (a[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
        # rank r owns query heads [2r, 2r+2) and KV group r: rows [Q_r; K_r; V_r]
        want = torch.cat([q[2 * d * r:2 * d * (r + 1)], k[d * r:d * (r + 1)], v[d * r:d * (r + 1)]])
        assert torch.equal(sd["layers.1.self_attn.qkv_proj.weight"], want)
        g, u = a["model.layers.0.mlp.gate_proj.weight"], a["model.layers.0.mlp.up_proj.weight"]
        assert torch.equal(sd["layers.0.mlp.gate_up_proj.weight"],
                           torch.cat([g[48 * r:48 * (r + 1)], u[48 * r:48 * (r + 1)]]))
        assert torch.equal(sd["layers.0.mlp.down_proj.weight"],
                           a["model.layers.0.mlp.down_proj.weight"][:, 48 * r:48 * (r + 1)])
        assert ("output_layer.weight" in sd) is (not tied)
    _convert("--load-format", "megatron_lite", "--save-format", "hf", "--load", tmp_path / "ours2",
             "--save", tmp_path / "hf1")
    b = _hf_tensors(tmp_path / "hf1")
    assert sorted(a) == sorted(b) and ("lm_head.weight" in b) is (not tied)  # tied: one tensor
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    hf_cfg = json.loads((tmp_path / "hf1" / "config.json").read_text())
    assert hf_cfg["tie_word_embeddings"] is tied and hf_cfg["vocab_size"] == V_ODD
    tokens = _tokens()
    lh, m = _hf_logits(tmp_path / "hf1", tokens)
    if tied:
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert torch.equal(lh, ref(input_ids=tokens).logits.float().detach())


def test_ours_tp2_to_tp4_to_hf_logits_and_sharding(tmp_path):
    """Resharding 2 -> 4 without HF in between, then an HF folder sharded at 40 kB whose logits
    equal ours; bf16 output casts every tensor and says so in config.json."""
    _hf_model(tmp_path / "hf0", heads=8, groups=4,
              rope={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    _convert("--load-format", "hf", "--save-format", "megatron_lite", "--load", tmp_path / "hf0",
             "--save", tmp_path / "ours2", "--target-tp", 2)
    _convert("--load-format", "megatron_lite", "--save-format", "megatron_lite",
             "--load", tmp_path / "ours2", "--save", tmp_path / "ours4", "--target-tp", 4)
    ck4 = tmp_path / "ours4" / "iter_0000000"
    assert sorted(p.name for p in ck4.glob("mp_rank_*")) == \
        [f"mp_rank_{r:02d}_model_states.pt" for r in range(4)]
    cfg4 = json.loads((ck4 / "run_config.json").read_text())["config"]
    assert cfg4["parallel"]["tensor_model_parallel_size"] == 4
    assert cfg4["derived"]["padded_vocab_size"] == 512
    _convert("--load-format", "megatron_lite", "--save-format", "hf", "--load", tmp_path / "ours4",
             "--save", tmp_path / "hf1", "--max-shard-size", "40KB")
    index = json.loads((tmp_path / "hf1" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((tmp_path / "hf1" / f).stat().st_size <= 40_000 + 1000
                                  for f in files if len(
                                      [k for k, v in index["weight_map"].items() if v == f]) > 1)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in
                                                  _hf_tensors(tmp_path / "hf0").values())
    hf_cfg = json.loads((tmp_path / "hf1" / "config.json").read_text())
    rope = hf_cfg.get("rope_parameters") or hf_cfg.get("rope_scaling")
    assert rope["rope_type"] == "linear" and rope["factor"] == 2.0
    tokens = _tokens()
    lo2, _ = _ours_logits(tmp_path / "ours2", tokens)
    lo4, _ = _ours_logits(tmp_path / "ours4", tokens)
    lh, _ = _hf_logits(tmp_path / "hf1", tokens)
    assert (lo2 - lh).abs().max() <= 1e-5 and (lo4 - lh).abs().max() <= 1e-5
    _convert("--load-format", "megatron_lite", "--save-format", "hf", "--load", tmp_path / "ours4",
             "--save", tmp_path / "hf_bf16", "--dtype", "bf16")
    a, b = _hf_tensors(tmp_path / "hf0"), _hf_tensors(tmp_path / "hf_bf16")
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].to(torch.bfloat16)) for k in a)
    assert json.loads((tmp_path / "hf_bf16" / "config.json").read_text())["dtype"] == "bfloat16"


# HF RoPE settings that change the logits (issue 14): (rope dict in config.json, top-level keys).
# max_position_embeddings is 64; sequences of 48 tokens pass the original lengths below.
ROPE_IMPORT_CASES = {
    # DeepSeek-style: attention factor get_mscale(4, 0.707) / get_mscale(4, 1.0) ~ 0.964
    "yarn_mscale": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 16, "mscale": 0.707,
                     "mscale_all_dim": 1.0}, {}),
    # equal mscales: attention factor exactly 1 (not 0.1 ln 4 + 1)
    "yarn_mscale_equal": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                           "original_max_position_embeddings": 16, "mscale": 1.0,
                           "mscale_all_dim": 1.0}, {}),
    # mscale alone: HF ignores it (0.1 ln s + 1); it used to be refused
    "yarn_mscale_alone": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                           "original_max_position_embeddings": 32, "mscale": 0.707}, {}),
    # a top-level original length has priority over the rope dict's (and over the fallback)
    "yarn_top_level_original": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "beta_fast": 8.0, "beta_slow": 0.5},
                                {"original_max_position_embeddings": 16}),
    "yarn_top_level_over_dict": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 64},
                                 {"original_max_position_embeddings": 16}),
    "llama3_top_level_original": ({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64},
                                  {"original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("case", sorted(ROPE_IMPORT_CASES))
def test_hf_rope_settings_imported_and_exported_logits_equal_hf(tmp_path, case):
    """HF -> ours: logits equal HF's own for YaRN mscale settings and a top-level
    original_max_position_embeddings (yarn and llama3); ours -> HF: config.json carries the keys
    in transformers 5 form (rope_parameters) and 4.x form (rope_theta + rope_scaling), and both
    rebuild the same model. The reference is transformers' own LlamaForCausalLM."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_lite.model.rope import RotaryEmbedding

    rope, top = ROPE_IMPORT_CASES[case]
    _hf_model(tmp_path / "hf0")
    cfg_path = tmp_path / "hf0" / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw.pop("rope_scaling", None)
    raw.update(rope_parameters=dict(rope), **top)
    cfg_path.write_text(json.dumps(raw))
    tokens = _tokens(s=48)
    lh, hf_model = _hf_logits(tmp_path / "hf0", tokens)
    hf_cfg = hf_model.config
    _, hf_attn = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg)
    assert hf_model.model.rotary_emb.attention_scaling == hf_attn
    _convert("--load-format", "hf", "--save-format", "megatron_lite", "--load", tmp_path / "hf0",
             "--save", tmp_path / "ours")
    lo, cfg = _ours_logits(tmp_path / "ours", tokens)
    m = cfg.model
    assert RotaryEmbedding(m).attention_factor == pytest.approx(hf_attn, rel=1e-12)
    want_orig = top.get("original_max_position_embeddings", rope.get(
        "original_max_position_embeddings"))
    assert m.rope_original_max_position_embeddings == want_orig
    assert (lo - lh).abs().max() <= 1e-5, (lo - lh).abs().max()
    # Back to HF: both forms written, each rebuilds HF's model.
    _convert("--load-format", "megatron_lite", "--save-format", "hf", "--load", tmp_path / "ours",
             "--save", tmp_path / "hf1")
    out = json.loads((tmp_path / "hf1" / "config.json").read_text())
    rp = out["rope_parameters"]
    for key in ("mscale", "mscale_all_dim", "low_freq_factor", "high_freq_factor", "beta_fast",
                "beta_slow"):
        if key in rope:
            assert rp[key] == rope[key], key
    assert rp["original_max_position_embeddings"] == want_orig
    assert out["rope_theta"] == rope["rope_theta"]
    assert out["rope_scaling"] == {**{k: v for k, v in rp.items() if k != "rope_theta"},
                                   "type": rope["rope_type"]}
    l1, _ = _hf_logits(tmp_path / "hf1", tokens)
    assert torch.equal(l1, lh) or (l1 - lh).abs().max() <= 1e-6
    v4 = {k: v for k, v in out.items() if k != "rope_parameters"}   # what a 4.x reader sees
    (tmp_path / "hf4").mkdir()
    for f in (tmp_path / "hf1").iterdir():
        shutil.copy(f, tmp_path / "hf4" / f.name)
    (tmp_path / "hf4" / "config.json").write_text(json.dumps(v4))
    l4, m4 = _hf_logits(tmp_path / "hf4", tokens)
    assert m4.config.rope_parameters["rope_type"] == rope["rope_type"]
    assert (l4 - lh).abs().max() <= 1e-6


def test_pytorch_model_bin_folder_reads_like_safetensors(tmp_path):
    """An HF folder with pytorch_model.bin converts to the same shards as its safetensors twin
    (tied; the .bin also stores an lm_head.weight copy, as some exporters do: accepted since equal,
    and not written twice)."""
    _hf_model(tmp_path / "st", tied=True)
    (tmp_path / "bin").mkdir()
    shutil.copyfile(tmp_path / "st" / "config.json", tmp_path / "bin" / "config.json")
    sd = _hf_tensors(tmp_path / "st")
    assert "lm_head.weight" not in sd
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    for name in ("st", "bin"):
        _convert("--load-format", "hf", "--save-format", "megatron_lite", "--load", tmp_path / name,
                 "--save", tmp_path / f"ours_{name}", "--target-tp", 2)
    for r in range(2):
        f = f"iter_0000000/mp_rank_{r:02d}_model_states.pt"
        a = torch.load(tmp_path / "ours_st" / f, weights_only=False)["module"]
        b = torch.load(tmp_path / "ours_bin" / f, weights_only=False)["module"]
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("groups", [2, 1])
def test_gqa_groups_below_tp_convert_and_reshard_exactly(tmp_path, groups):
    """Fewer KV groups than TP ranks (issue 16): HF -> ours at TP=4 (each group's K/V replicated on
    the 4/g ranks that read it), back to HF, and TP=4 -> 2 -> HF and 4 -> 1 -> HF, all bitwise; the
    TP=4 checkpoint loads at TP=1 with HF's logits."""
    ref = _hf_model(tmp_path / "hf0", heads=4, groups=groups)
    _convert("--load-format", "hf", "--save-format", "megatron_lite", "--load", tmp_path / "hf0",
             "--save", tmp_path / "ours4", "--target-tp", 4)
    a = _hf_tensors(tmp_path / "hf0")
    d, share = 16, 4 // groups
    q, k, v = (a[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    for r in range(4):   # rank r: query head r alone, the K/V rows of group r // (4/g)
        sd = torch.load(tmp_path / "ours4" / "iter_0000000" / f"mp_rank_{r:02d}_model_states.pt",
                        weights_only=False)["module"]
        j = r // share
        assert torch.equal(sd["layers.1.self_attn.qkv_proj.weight"], q[d * r:d * (r + 1)])
        assert torch.equal(sd["layers.1.self_attn.qkv_proj.kv_weight"],
                           torch.cat([k[d * j:d * (j + 1)], v[d * j:d * (j + 1)]]))
    for tp in (2, 1):
        _convert("--load-format", "megatron_lite", "--save-format", "megatron_lite", "--load",
                 tmp_path / "ours4", "--save", tmp_path / f"ours{tp}", "--target-tp", tp)
    for src in ("ours4", "ours2", "ours1"):
        _convert("--load-format", "megatron_lite", "--save-format", "hf", "--load", tmp_path / src,
                 "--save", tmp_path / f"hf_{src}")
        b = _hf_tensors(tmp_path / f"hf_{src}")
        assert sorted(a) == sorted(b) and all(torch.equal(a[key], b[key]) for key in a), src
    tokens = _tokens()
    logits, _ = _ours_logits(tmp_path / "ours4", tokens)      # resharded 4 -> 1 in memory
    torch.testing.assert_close(logits, ref(input_ids=tokens).logits.float().detach(), rtol=0, atol=1e-5)


def test_tokenizer_files_and_eval_ppl(tmp_path, tiny_corpus_and_tokenizer):
    """An HF folder gets tokenizer.model, a tokenizer.json with SentencePiece's ids and bos/eos;
    tools/eval_ppl.py gives the same perplexity for the HF folder and the converted ours."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    _, sp_model = tiny_corpus_and_tokenizer
    _hf_model(tmp_path / "hf0", vocab=512, tied=True)
    _convert("--load-format", "hf", "--save-format", "megatron_lite", "--load", tmp_path / "hf0",
             "--save", tmp_path / "ours", "--target-tp", 1, "--tokenizer-model", sp_model)
    _convert("--load-format", "megatron_lite", "--save-format", "hf", "--load", tmp_path / "ours",
             "--save", tmp_path / "hf1")
    out = tmp_path / "hf1"
    assert (out / "tokenizer.model").read_bytes() == open(sp_model, "rb").read()
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = AutoTokenizer.from_pretrained(str(out))
    for text in ["the model returns 42", "café 日本語\n  indented", "x"]:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    make_dataset(str(tmp_path / "data"))
    eval_ppl = load_tool("eval_ppl")
    common = ["--data-path", str(tmp_path / "data"), "--seq-length", "32", "--max-tokens", "400",
              "--device", "cpu"]
    r_ours = eval_ppl.main(["--load", str(tmp_path / "ours")] + common)
    r_hf = eval_ppl.main(["--load", str(tmp_path / "hf0"), "--load-format", "hf"] + common)
    assert r_ours["tokens"] == r_hf["tokens"] > 0
    assert r_ours["nll"] == pytest.approx(r_hf["nll"], abs=1e-6)


# ----------------------------------------------------------------------------- bad input
def _expect_error(capsys, tmp_path, argv, *needles):
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit):
        _convert(*argv)
    err = capsys.readouterr().err
    for n in needles:
        assert str(n) in err, (n, err)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no .tmp_ leftovers
    return err


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "hf0"
    _hf_model(src)
    out = tmp_path / "out"
    hf_in = ["--load-format", "hf", "--save-format", "megatron_lite", "--save", out]
    # sharded HF folder with a shard missing
    _convert("--load-format", "hf", "--save-format", "hf", "--load", src, "--save",
             tmp_path / "sharded", "--max-shard-size", "50KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / "sharded" / victim)
    _expect_error(capsys, tmp_path, hf_in + ["--load", tmp_path / "sharded"], victim, "do not exist")
    # weights that do not fit the config (shape mismatch), the key named
    cfg_path = src / "config.json"
    good = cfg_path.read_text()
    cfg_path.write_text(json.dumps(dict(json.loads(good), intermediate_size=128)))
    _expect_error(capsys, tmp_path, hf_in + ["--load", src], "model.layers.0.mlp.gate_proj.weight",
                  "(96, 64)", "(128, 64)")
    # unknown architecture
    cfg_path.write_text(json.dumps(dict(json.loads(good), model_type="gpt2",
                                        architectures=["GPT2LMHeadModel"])))
    _expect_error(capsys, tmp_path, hf_in + ["--load", src], str(cfg_path), "GPT2LMHeadModel")
    # missing config
    os.remove(cfg_path)
    _expect_error(capsys, tmp_path, hf_in + ["--load", src], str(cfg_path), "missing")
    cfg_path.write_text(good)
    # ours with a TP shard missing: the manifest makes the checkpoint incomplete
    _convert(*hf_in, "--load", src, "--target-tp", 2)
    _expect_error(capsys, tmp_path, hf_in + ["--load", src], str(out), "not empty", "--force")
    os.remove(out / "iter_0000000" / "mp_rank_01_model_states.pt")
    with pytest.warns(UserWarning, match="incomplete or missing"):
        _expect_error(capsys, tmp_path, ["--load-format", "megatron_lite", "--save-format", "hf",
                                         "--load", out, "--save", tmp_path / "y"], "no complete")
    # a DeepSpeed folder without any config (neither run_config.json nor an HF config.json)
    bare = tmp_path / "bare" / "global_step3"
    bare.mkdir(parents=True)
    shutil.copyfile(out / "iter_0000000" / "mp_rank_00_model_states.pt",
                    bare / "mp_rank_00_model_states.pt")
    _expect_error(capsys, tmp_path, ["--load-format", "deepspeed", "--save-format", "hf",
                                     "--load", bare, "--save", tmp_path / "y"],
                  "missing config", "run_config.json", "config.json")
    # --force replaces a non-empty folder only after the new one is complete
    _convert(*hf_in, "--load", src, "--target-tp", 1, "--force")
    assert json.loads((out / "iter_0000000" / "run_config.json").read_text())[
        "config"]["parallel"]["tensor_model_parallel_size"] == 1
    assert not (out / "iter_0000000" / "mp_rank_01_model_states.pt").exists()


def test_unwritable_save_location_is_a_clear_error(tmp_path, capsys):
    """--save under a file, or where no folder can be made (/proc refuses mkdir even to root):
    one line naming --save, checked before the input is read (it does not exist here)."""
    (tmp_path / "afile").write_text("x")
    common = ["--load-format", "hf", "--save-format", "megatron_lite", "--load", tmp_path / "nope"]
    err = _expect_error(capsys, tmp_path, common + ["--save", tmp_path / "afile" / "sub"])
    assert err.strip().splitlines() == [
        f"convert_checkpoint.py: error: --save {tmp_path}/afile/sub: {tmp_path}/afile is a file, not "
        "a folder, so nothing can be created under it; remove it or choose another path"]
    if os.path.isdir("/proc/self"):
        err = _expect_error(capsys, tmp_path, common + ["--save", "/proc/h2x"])
        assert len(err.strip().splitlines()) == 1
        assert err.startswith("convert_checkpoint.py: error: --save /proc/h2x: cannot be created: "
                              "the folder /proc ")


def test_parse_size_and_help():
    from megatron_lite.convert import ConversionError, parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 5 * 10**8 and parse_size("1234") == 1234
    with pytest.raises(ConversionError, match="--max-shard-size"):
        parse_size("five gigs")
    text = load_tool("convert_checkpoint").build_parser().format_help()
    for flag in ("--load-format", "--save-format", "--load", "--save", "--target-tp", "--dtype",
                 "--max-shard-size", "--tokenizer-model", "--iteration", "--force"):
        assert flag in text


# ----------------------------------------------------------------------------- training checkpoints
_BASE = ["--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "2",
         "--train-iters", "2", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1",
         "--split", "100,0,0", "--num-workers", "0", "--log-interval", "1", "--eval-interval", "0",
         "--seed", "7", "--device", "cpu"]


def _driver(root: str) -> None:
    """Body of the torchrun launch (2 processes): a ZeRO-2 bf16 run (TP=1, D=2), a ZeRO-3 run at
    TP=2 (D=1), --finetune from a converted HF checkpoint at learning rate 1e-30 (TP=2), and a raw
    DeepSpeed ZeRO-2 checkpoint of an HF LlamaForCausalLM."""
    import deepspeed
    import torch.distributed as dist

    from megatron_lite.config import parse_args
    from megatron_lite.training.loop import pretrain

    results = {}
    data = ["--data-path", os.path.join(root, "data")]
    tiny = ["--model-size", "tiny", "--vocab-size", "256"]
    with open(os.path.join(root, "ft_flags.json")) as f:
        ft_flags = json.load(f)
    runs = {
        # bf16 matmuls are slow on CPU: a smaller model, one step
        "z2": tiny + _BASE + data + ["--zero-stage", "2", "--bf16", "--save", f"{root}/ck_z2",
                                     "--num-layers", "1", "--hidden-size", "64",
                                     "--ffn-hidden-size", "128", "--train-iters", "1",
                                     "--lr-warmup-iters", "0"],
        "z3": tiny + _BASE + data + ["--num-query-groups", "4", "--tp", "2", "--zero-stage", "3",
                                     "--save", f"{root}/ck_z3", "--save-interval", "1"],
        "ft": ft_flags + _BASE + data + ["--tp", "2", "--zero-stage", "2", "--finetune",
                                         "--load", f"{root}/ours_ft", "--save", f"{root}/ck_ft",
                                         "--train-iters", "1", "--lr", "1e-30", "--min-lr", "0",
                                         "--lr-warmup-iters", "0"],
        # the same at ZeRO-3 (weights copied into the partitioned parameters, not DeepSpeed's
        # stage-3 module load, which needs optimizer partitions a converted folder lacks)
        "ft3": ft_flags + _BASE + data + ["--tp", "2", "--zero-stage", "3", "--finetune",
                                          "--load", f"{root}/ours_ft", "--save", f"{root}/ck_ft3",
                                          "--train-iters", "1", "--lr", "1e-30", "--min-lr", "0",
                                          "--lr-warmup-iters", "0"],
    }
    import time

    for name, argv in runs.items():
        t0 = time.time()
        try:
            results[name] = {"iteration": pretrain(parse_args(argv)).iteration}
        except Exception as e:  # noqa: BLE001 - recorded for the test to assert on
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[convert-test] {name}: {time.time() - t0:.1f} s {results[name]}", file=sys.stderr,
              flush=True)
    from transformers import LlamaForCausalLM

    from megatron_lite import parallel

    parallel.destroy_model_parallel()   # the raw run: TP=1, D=2
    parallel.initialize_model_parallel(1)
    model = LlamaForCausalLM.from_pretrained(os.path.join(root, "raw"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, mpu=parallel.mpu, config={
        "train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True})
    x = _tokens(b=1, s=16, seed=dist.get_rank())
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    engine.save_checkpoint(os.path.join(root, "raw"), tag="global_step1")
    if dist.get_rank() == 0:
        torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()},
                   os.path.join(root, "raw_ref.pt"))
        with open(os.path.join(root, "results.json"), "w") as f:
            json.dump(results, f)
    dist.barrier()


@pytest.fixture(scope="module")
def launch():
    """One torchrun launch of :func:`_driver`; yields (root, results).

    The folder is made with tempfile, not under pytest's basetemp: concurrent pytest sessions of
    one user prune each other's older basetemp folders, which took this one away mid-launch."""
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(prefix="convert_launch_"))
    try:
        yield _launch(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _launch(root):
    from megatron_lite.convert import load_checkpoint
    from megatron_lite.convert.ours_io import model_flags

    make_dataset(str(root / "data"))
    _hf_model(root / "hf_ft", tied=False, seed=1)
    _convert("--load-format", "hf", "--save-format", "megatron_lite", "--load", root / "hf_ft",
             "--save", root / "ours_ft", "--target-tp", 2)
    flags = model_flags(load_checkpoint(str(root / "ours_ft"), "megatron_lite").model_config)
    (root / "ft_flags.json").write_text(json.dumps(flags))
    _hf_model(root / "raw", seed=2)
    run_torchrun(__file__, root, env={"HF_HUB_OFFLINE": "1"})
    return root, json.loads((root / "results.json").read_text())


@pytest.mark.slow
def test_zero2_bf16_checkpoint_consolidates_fp32_master_weights(launch):
    from megatron_lite.convert import load_checkpoint

    root, res = launch
    assert res["z2"] == {"iteration": 1}
    master = load_checkpoint(str(root / "ck_z2"), "deepspeed").state    # ZeRO partitions
    module = load_checkpoint(str(root / "ck_z2"), "megatron_lite").state  # bf16 module copy
    assert sorted(master) == sorted(module)
    differs = 0
    for k, t in master.items():
        assert t.dtype == torch.float32 and module[k].dtype == torch.bfloat16, k
        assert torch.equal(t.to(torch.bfloat16), module[k]), k   # the bf16 copy rounds the master
        differs += not torch.equal(t, module[k].float())
    assert differs > 0   # the master weights carry bits the bf16 module lacks
    _convert("--load-format", "deepspeed", "--save-format", "hf", "--load", root / "ck_z2",
             "--save", root / "z2_hf")
    assert all(torch.equal(v, master[k]) for k, v in _hf_tensors(root / "z2_hf").items())


@pytest.mark.slow
def test_zero3_tp2_checkpoint_to_tp4_to_hf_logits_equal_ours(launch):
    from megatron_lite.convert import load_checkpoint

    root, res = launch
    assert res["z3"] == {"iteration": 2}
    ds = load_checkpoint(str(root / "ck_z3"), "deepspeed")
    ours = load_checkpoint(str(root / "ck_z3"), "megatron_lite")   # gathered model_tp_XX.pt
    assert sorted(ds.state) == sorted(ours.state)
    assert all(torch.equal(ds.state[k], ours.state[k]) for k in ds.state)
    _convert("--load-format", "deepspeed", "--save-format", "megatron_lite", "--load",
             root / "ck_z3", "--save", root / "z3_tp4", "--target-tp", 4)
    _convert("--load-format", "megatron_lite", "--save-format", "hf", "--load", root / "z3_tp4",
             "--save", root / "z3_hf")
    tokens = _tokens(vocab=256)
    lo, cfg = _ours_logits(root / "ck_z3", tokens, vocab=256)
    assert cfg.parallel.zero_stage == 3
    lh, _ = _hf_logits(root / "z3_hf", tokens)
    assert (lo - lh).abs().max() <= 1e-5
    # --iteration 1 reads the earlier checkpoint (latest is iter_0000002), in both formats
    first = load_checkpoint(str(root / "ck_z3"), "deepspeed", iteration=1)
    assert first.iteration == 1 and ds.iteration == 2
    assert not torch.equal(first.state["model.norm.weight"], ds.state["model.norm.weight"])
    _convert("--load-format", "megatron_lite", "--save-format", "megatron_lite", "--load",
             root / "ck_z3", "--save", root / "z3_it1", "--iteration", 1, "--target-tp", 1)
    assert (root / "z3_it1" / "latest").read_text().strip() == "iter_0000001"
    again = load_checkpoint(str(root / "z3_it1"), "megatron_lite")
    assert all(torch.equal(again.state[k], first.state[k]) for k in first.state)


@pytest.mark.slow
def test_hf_converted_in_finetuned_zero_steps_converted_out_is_identical(launch):
    root, res = launch
    # --lr must be > 0: one step at 1e-30 moves no weight of magnitude > 2^-76 (Adam's step is
    # at most lr per element, decay multiplies by 1 - 1e-31 == 1 in fp32): "trained 0 steps"
    a = _hf_tensors(root / "hf_ft")
    for run in ("ft", "ft3"):  # ZeRO-2 and ZeRO-3
        assert res[run] == {"iteration": 1}, res[run]
        _convert("--load-format", "megatron_lite", "--save-format", "hf", "--load",
                 root / f"ck_{run}", "--save", root / f"{run}_hf")
        b = _hf_tensors(root / f"{run}_hf")
        assert sorted(a) == sorted(b)
        differ = {k: float((a[k].float() - b[k].float()).abs().max())
                  for k in a if not torch.equal(a[k], b[k])}
        assert not differ, (run, differ)


@pytest.mark.slow
def test_raw_deepspeed_checkpoint_of_hf_model(launch):
    root, _ = launch
    _convert("--load-format", "deepspeed", "--save-format", "hf", "--load", root / "raw",
             "--save", root / "raw_hf")
    ref = torch.load(root / "raw_ref.pt", weights_only=True)
    got = _hf_tensors(root / "raw_hf")
    assert sorted(got) == sorted(k for k in ref if not k.endswith("inv_freq"))
    assert all(torch.equal(got[k], ref[k]) for k in got)
    assert not torch.equal(got["model.norm.weight"], torch.ones(64))  # it did train a step


if __name__ == "__main__":
    _driver(sys.argv[1])
