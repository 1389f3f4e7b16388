"""Tests for megatron_lite.eval: stream perplexity (plain and sliding) against a brute-force
computation with an independent toy model, window plans by hand, evaluate() token weighting over
micro-batches and DP ranks, and the eval_ppl CLI."""

import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megatron_lite.eval import (EvalConfig, build_stream, evaluate, plan_windows,
                                stream_perplexity)

V, D = 11, 5


class CtxMeanLM(torch.nn.Module):
    """Toy causal LM whose prediction depends on the WHOLE window prefix (so a wrong window
    start or a leak from later tokens changes the result): logits_i = mean(E[x_0..x_i]) @ W +
    B[x_i]. fp64, so the brute force can be compared to 1e-12."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.E = torch.nn.Parameter(torch.randn(V, D, generator=g, dtype=torch.float64))
        self.W = torch.nn.Parameter(torch.randn(D, V, generator=g, dtype=torch.float64))
        self.B = torch.nn.Parameter(torch.randn(V, V, generator=g, dtype=torch.float64))

    def forward(self, tokens, position_ids=None, cu_seqlens=None, max_seqlen=None, labels=None):
        e = self.E[tokens]
        steps = torch.arange(1, tokens.shape[1] + 1, dtype=e.dtype)[None, :, None]
        logits = (e.cumsum(1) / steps) @ self.W + self.B[tokens]
        if labels is None:
            return logits
        return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                               reduction="none")


def brute_force_nll(model, stream, L, S):
    """Independent numpy computation: target j is scored once, by the window starting at
    p_j = S * max(0, ceil((j - L) / S)), with context stream[p_j:j]."""
    E, W, B = (p.detach().numpy() for p in (model.E, model.W, model.B))
    total = 0.0
    for j in range(1, len(stream)):
        p = S * max(0, -(-(j - L) // S))
        assert p < j <= p + L
        h = E[stream[p:j]].mean(0)
        logit = h @ W + B[stream[j - 1]]
        total += np.logaddexp.reduce(logit) - logit[stream[j]]
    return total / (len(stream) - 1)


def test_plan_windows_by_hand():
    assert plan_windows(10, 4) == [(0, 4, 0), (4, 4, 0), (8, 1, 0)]
    assert plan_windows(10, 4, 2) == [(0, 4, 0), (2, 4, 2), (4, 4, 2), (6, 3, 2)]
    assert plan_windows(10, 20) == [(0, 9, 0)]
    assert plan_windows(2, 4, 1) == [(0, 1, 0)]
    for n, L, S in [(50, 8, 8), (50, 8, 3), (50, 8, 1), (33, 7, 5), (9, 8, 8)]:
        assert sum(length - first for _, length, first in plan_windows(n, L, S)) == n - 1
    with pytest.raises(ValueError, match="--stride"):
        plan_windows(10, 4, 5)
    with pytest.raises(ValueError, match="no target"):
        plan_windows(1, 4)


@pytest.mark.parametrize("n,L,S,mbs", [(50, 8, 8, 1), (50, 8, 8, 3), (50, 8, 3, 2),
                                        (50, 8, 1, 4), (33, 7, 5, 3), (20, 64, None, 2)])
def test_stream_perplexity_matches_brute_force(n, L, S, mbs):
    model = CtxMeanLM()
    stream = np.random.default_rng(n + L).integers(0, V, size=n)
    out = stream_perplexity(lambda t, l: model(t, labels=l), stream, L, S, micro_batch_size=mbs)
    expected = brute_force_nll(model, stream, L, S or L)
    assert out["tokens"] == n - 1
    assert out["nll"] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert out["ppl"] == pytest.approx(math.exp(expected), rel=1e-12)


def test_sliding_differs_from_plain_and_stream_from_dataset(tmp_path):
    # Documents written in order through the Megatron .bin/.idx builder, EOD (=0) appended.
    docs = [[3, 4, 5, 0], [6, 7, 0], [8, 9, 10, 1, 2, 0], [4, 4, 0]]
    b = IndexedDatasetBuilder(str(tmp_path / "d.bin"), dtype=np.int32)
    for d in docs:
        b.add_document(d)
    b.finalize(str(tmp_path / "d.idx"))
    ds = IndexedDataset(str(tmp_path / "d"))
    full = build_stream(ds)
    assert full.tolist() == sum(docs, [])
    assert build_stream(ds, max_tokens=9).tolist() == sum(docs, [])[:9]
    with pytest.raises(ValueError, match="--max-tokens"):
        build_stream(ds, max_tokens=1)
    model = CtxMeanLM(seed=3)
    f = lambda t, l: model(t, labels=l)  # noqa: E731
    plain = stream_perplexity(f, full, 5)
    sliding = stream_perplexity(f, full, 5, 2)
    assert plain["tokens"] == sliding["tokens"] == len(full) - 1 == 15
    assert plain["nll"] == pytest.approx(brute_force_nll(model, full, 5, 5), rel=1e-12)
    assert sliding["nll"] == pytest.approx(brute_force_nll(model, full, 5, 2), rel=1e-12)
    assert abs(plain["nll"] - sliding["nll"]) > 1e-6  # the context really differs


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate_reference(model):
    loss, tokens = 0.0, 0.0
    for rank in range(2):
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(rank + 1):
            t = torch.randint(0, V, (2, 6), generator=g)
            m = (torch.rand(2, 6, generator=g) > 0.3).double()
            logits = model(t).detach()
            nll = torch.logsumexp(logits, -1) - logits.gather(-1, torch.roll(t, -1, 1)[..., None])[..., 0]
            loss += float((nll * m).sum())
            tokens += float(m.sum())
    return loss / tokens, tokens


def test_evaluate_single_process_restores_mode():
    model = CtxMeanLM()
    model.train()
    t = torch.tensor([[1, 2, 3, 4]])
    batch = {"tokens": t, "labels": torch.tensor([[2, 3, 4, -100]]),
             "loss_mask": torch.tensor([[1.0, 0.0, 1.0, 0.0]])}
    out = evaluate(model, iter([batch, batch]), eval_iters=2)
    logits = model(t).detach()
    nll = torch.logsumexp(logits, -1)[0, :3] - logits[0, [0, 1, 2], [2, 3, 4]]
    assert out["tokens"] == 4 and model.training
    assert out["val_loss"] == pytest.approx(float(nll[0] + nll[2]) / 2, rel=1e-12)
    with pytest.warns(UserWarning, match="ran out after 1 of 3"):
        assert evaluate(model, iter([batch]), eval_iters=3)["tokens"] == 2
    zero = dict(batch, loss_mask=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="no loss tokens"):
        evaluate(model, iter([zero]), eval_iters=1)
    with pytest.raises(ValueError, match="--eval-interval"):
        EvalConfig(eval_interval=-1)
    with pytest.raises(ValueError, match="--eval-interval 0"):
        EvalConfig(eval_iters=0)


# ---------------------------------------------------------------------------------------------
# tools/eval_ppl.py on tiny checkpoints: ours (TP=1 via the CLI, TP=2 in two processes) and HF.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2,
        "ffn_hidden_size": 64, "vocab_size": 50, "seq_length": 16, "micro_batch_size": 1,
        "train_iters": 1}


class _SaveOnlyEngine:
    """Stands in for the DeepSpeed engine in save_checkpoint: writes DeepSpeed's module file
    (``mp_rank_XX_model_states.pt`` holding ``{"module": state_dict}``) and nothing else."""

    def __init__(self, module, tp_rank):
        self.module, self.tp_rank = module, tp_rank

    def save_checkpoint(self, save_dir, tag, save_latest=False):
        path = os.path.join(save_dir, tag)
        os.makedirs(path, exist_ok=True)
        torch.save({"module": self.module.state_dict()},
                   os.path.join(path, f"mp_rank_{self.tp_rank:02d}_model_states.pt"))


class _Sched:
    def state_dict(self):
        return {}


def _save_tiny_checkpoint(save_dir, world_size, **overrides):
    from megatron_lite import parallel
    from megatron_lite.config import load_config
    from megatron_lite.model.llama import LlamaModel
    from megatron_lite.checkpoint.engine_state import save_checkpoint

    cfg = load_config(None, dict(TINY, tensor_model_parallel_size=world_size,
                                 global_batch_size=1, **overrides), world_size=world_size)
    torch.manual_seed(1234)  # LlamaModel's init is independent of the TP degree
    model = LlamaModel(cfg.model)

    class State:
        iteration, consumed_samples, skipped_steps, consecutive_skipped = 1, 1, 0, 0

    save_checkpoint(_SaveOnlyEngine(model, parallel.get_tensor_model_parallel_rank()), cfg,
                    State(), _Sched(), save_dir)
    return cfg


def _write_dataset(prefix, docs):
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in docs:
        b.add_document(d)
    b.finalize(prefix + ".idx")


def _tiny_docs(vocab, n_docs=6, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, vocab, size=int(rng.integers(3, 12)))) + [0]
            for _ in range(n_docs)]


def _brute_force_logits_nll(next_logits, stream, L, S):
    """Mean NLL where target j is predicted from the window context stream[p_j:j] alone."""
    total = 0.0
    for j in range(1, len(stream)):
        p = S * max(0, -(-(j - L) // S))
        with torch.no_grad():
            logits = next_logits(torch.as_tensor(stream[p:j], dtype=torch.int64)[None])
        total += float(torch.logsumexp(logits, -1) - logits[stream[j]])
    return total / (len(stream) - 1)


def _run_cli(*args):
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, os.path.join(REPO, "tools", "eval_ppl.py"), *args, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_eval_ppl_cli_our_checkpoint(tmp_path):
    from megatron_lite.checkpoint.weights import load_model_for_inference

    _save_tiny_checkpoint(str(tmp_path / "ckpt"), 1)
    docs = _tiny_docs(50)
    _write_dataset(str(tmp_path / "val"), docs)
    stream = np.array(sum(docs, []), dtype=np.int64)[:40]
    model, _ = load_model_for_inference(str(tmp_path / "ckpt"), 0, 1)
    ref = _brute_force_logits_nll(lambda t: model(t)[0, -1, :50].double(), stream, 8, 3)
    out = _run_cli("--load", str(tmp_path / "ckpt"), "--data-path", str(tmp_path / "val"),
                   "--seq-length", "8", "--stride", "3", "--max-tokens", "40",
                   "--micro-batch-size", "2")
    assert out["tokens"] == 39
    assert out["nll"] == pytest.approx(ref, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(out["nll"]), rel=1e-12)


def _two_process_worker(rank, port, tmp, q):
    """Two gloo ranks: first as DP=2 (stream perplexity split, evaluate() reduction), then as
    TP=2 (save a TP-sharded checkpoint, run tools/eval_ppl.py's main at --tp 2)."""
    os.environ.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    # DP = 2 (no model-parallel groups yet: the default group is the DP group).
    model = CtxMeanLM()
    stream = np.random.default_rng(7).integers(0, V, size=41)
    ppl = stream_perplexity(lambda t, l: model(t, labels=l), stream, 6, 4,
                            micro_batch_size=2, dp_rank=rank, dp_size=2)
    # evaluate(): rank r sees r + 1 micro-batches, so the token mean differs from the mean of
    # per-rank means.
    g = torch.Generator().manual_seed(100 + rank)
    batches = []
    for _ in range(rank + 1):
        tokens = torch.randint(0, V, (2, 6), generator=g)
        mask = (torch.rand(2, 6, generator=g) > 0.3).float()
        batches.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": mask})
    ev = evaluate(model, iter(batches), eval_iters=5)
    # TP = 2.
    from megatron_lite import parallel
    parallel.initialize_model_parallel(2)
    _save_tiny_checkpoint(os.path.join(tmp, "ckpt_tp2"), 2)
    import importlib.util
    spec = importlib.util.spec_from_file_location("eval_ppl", os.path.join(REPO, "tools",
                                                                           "eval_ppl.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tp = mod.main(["--load", os.path.join(tmp, "ckpt_tp2"), "--tp", "2", "--data-path",
                   os.path.join(tmp, "val"), "--seq-length", "8"])
    # A HuggingFace folder at TP = 2 (converted through hf_adapter), under torchrun-style env.
    hf = mod.main(["--load-format", "hf", "--load", os.path.join(tmp, "hf"), "--tp", "2",
                   "--data-path", os.path.join(tmp, "val"), "--seq-length", "16", "--stride",
                   "5"])
    # Generation at TP = 2: full-vocabulary logits gathered over the TP group.
    from megatron_lite.eval.generation import generate
    from megatron_lite.eval.loading import load_model
    loaded = load_model(os.path.join(tmp, "hf"), "hf", torch.device("cpu"))
    greedy = generate(loaded.logits, [5, 9, 13, 2], 8, greedy=True)
    sampled = generate(loaded.logits, [5, 9, 13, 2], 8, greedy=False, top_p=0.9,
                       generator=torch.Generator().manual_seed(11 + rank))  # rank 0 decides
    q.put((rank, ppl, ev, tp, hf, greedy, sampled))
    parallel.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def test_two_processes_dp_split_and_tp2_checkpoint(tmp_path):
    """DP=2 stream perplexity == 1 process; evaluate() == token mean over both ranks' batches;
    eval_ppl at TP=2 on a TP-sharded checkpoint == brute force with the TP=1 model."""
    from megatron_lite.config import load_config
    from megatron_lite.model.llama import LlamaModel

    docs = _tiny_docs(50, seed=1)
    _write_dataset(str(tmp_path / "val"), docs)
    hf_model = _make_hf_folder(str(tmp_path / "hf"))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_two_process_worker, args=(r, port, str(tmp_path), q))
             for r in range(2)]
    for p in procs:
        p.start()
    results = {r: rest for r, *rest in (q.get(timeout=240) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    toy = CtxMeanLM()
    single = stream_perplexity(lambda t, l: toy(t, labels=l),
                               np.random.default_rng(7).integers(0, V, size=41), 6, 4)
    ref_loss, ref_tokens = _evaluate_reference(toy)
    cfg = load_config(None, dict(TINY, global_batch_size=1))
    torch.manual_seed(1234)  # same seed as the TP=2 checkpoint; init is TP-independent
    model = LlamaModel(cfg.model).eval()
    stream = np.array(sum(docs, []), dtype=np.int64)
    with torch.no_grad():
        ref_tp = _brute_force_logits_nll(lambda t: model(t)[0, -1, :50].double(), stream, 8, 8)
    with torch.no_grad():
        ref_hf = _brute_force_logits_nll(lambda t: hf_model(input_ids=t).logits[0, -1].double(),
                                         stream, 16, 5)
    with torch.no_grad():
        ref_greedy = hf_model.generate(torch.tensor([[5, 9, 13, 2]]), max_new_tokens=8,
                                       do_sample=False, pad_token_id=0,
                                       eos_token_id=None)[0, 4:].tolist()
    assert results[0][4] == results[1][4] == ref_greedy
    assert results[0][5] == results[1][5]  # different seeds per rank, rank 0's choice broadcast
    for r in range(2):
        ppl, ev, tp, hf = results[r][:4]
        assert hf["tokens"] == len(stream) - 1
        assert hf["nll"] == pytest.approx(ref_hf, rel=1e-5)
        assert ppl["tokens"] == 40 == single["tokens"]
        assert ppl["nll"] == pytest.approx(single["nll"], rel=1e-12)
        assert ev["tokens"] == ref_tokens
        assert ev["val_loss"] == pytest.approx(ref_loss, rel=1e-12)
        assert ev["val_ppl"] == pytest.approx(math.exp(ref_loss), rel=1e-12)
        assert tp["tokens"] == len(stream) - 1
        assert tp["nll"] == pytest.approx(ref_tp, rel=1e-5)
    assert results[0][2] == results[1][2]


def _make_hf_folder(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)).eval()
    if path is not None:
        hf.save_pretrained(path)
    return hf


def test_eval_ppl_hf_folder(tmp_path, capsys):
    hf = _make_hf_folder(str(tmp_path / "hf"))
    docs = _tiny_docs(50, seed=2)
    _write_dataset(str(tmp_path / "val"), docs)
    stream = np.array(sum(docs, []), dtype=np.int64)
    with torch.no_grad():
        ref = _brute_force_logits_nll(lambda t: hf(input_ids=t).logits[0, -1].double(),
                                      stream, 16, 5)
    import importlib.util
    spec = importlib.util.spec_from_file_location("eval_ppl", os.path.join(REPO, "tools",
                                                                           "eval_ppl.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--load-format", "hf", "--load", str(tmp_path / "hf"), "--data-path",
              str(tmp_path / "val"), "--seq-length", "16", "--stride", "5", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"] == len(stream) - 1
    assert out["nll"] == pytest.approx(ref, rel=1e-5)


# ------------------------------------------------ window conventions vs the HF guide (issue 14)
def _hf_guide_loop(model, input_ids, max_length, stride):
    """The loop of the HuggingFace guide "Perplexity of fixed-length models" (transformers docs),
    written out as published: windows of max_length tokens, labels -100 before trg_len, the
    model's own shifted mean loss weighted by (valid labels - batch size)."""
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        ids = input_ids[:, begin_loc:end_loc]
        target_ids = ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(ids, labels=target_ids).loss
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return float(nll_sum / n_tokens)


def _exact_window_loop(model, input_ids, window_tokens, stride):
    """The guide's windows, each spanning ``window_tokens`` stream tokens, but every newly
    scored target counted once with its own NLL (no weighting): our convention when
    ``window_tokens = L + 1``."""
    seq_len = input_ids.size(1)
    total, count, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + window_tokens, seq_len)
        ids = input_ids[:, begin_loc:end_loc]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        for j in range(max(prev_end_loc, begin_loc + 1), end_loc):
            total -= float(logp[j - begin_loc - 1, input_ids[0, j]])
            count += 1
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    assert count == seq_len - 1
    return total / count


@pytest.mark.parametrize("n,L,S", [(40, 8, 8), (40, 8, 3), (41, 8, 7), (40, 8, 1), (33, 8, 8),
                                   (17, 32, 4)])
def test_window_conventions_equal_the_hf_guide_loop(n, L, S):
    """--window-convention hf == the HF guide's loop (its windows of L tokens and its weighting);
    ours == the same walk with windows of L + 1 stream tokens and exact per-token counting."""
    hf = _make_hf_folder(None)
    stream = np.array(sum(_tiny_docs(50, n_docs=12, seed=3), []), dtype=np.int64)[:n]
    ids = torch.as_tensor(stream)[None]

    def loss_fn(t, labels):
        logits = hf(input_ids=t).logits.float()
        return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                               reduction="none")

    got_hf = stream_perplexity(loss_fn, stream, L, S, micro_batch_size=3, convention="hf")
    want_hf = _hf_guide_loop(hf, ids, L, S)
    if (n - 1) % S == 0 and S == L:   # a last window of one token: the guide's loop gives 0/0
        assert math.isnan(want_hf)
        want_hf = _hf_guide_loop(hf, ids[:, :-1], L, S)   # ... which we leave out
    assert got_hf["nll"] == pytest.approx(want_hf, rel=1e-6)
    assert got_hf["ppl"] == pytest.approx(math.exp(want_hf), rel=1e-6)
    # targets scored: N - 1, less the first token of every window when windows do not overlap
    assert got_hf["tokens"] == (n - 1 if S < L else n - math.ceil(n / L))
    got = stream_perplexity(loss_fn, stream, L, S, micro_batch_size=3)
    assert got["tokens"] == n - 1
    assert got["nll"] == pytest.approx(_exact_window_loop(hf, ids, L + 1, S), rel=1e-6)
    if n > L:
        assert got["nll"] != pytest.approx(got_hf["nll"], rel=1e-6)   # different numbers


def test_plan_windows_hf_by_hand():
    # N = 10, L = 4: the guide's windows [0,4) [4,8) [8,10) score t1-t3, t5-t7, t9
    assert plan_windows(10, 4, convention="hf") == [(0, 3, 0), (4, 3, 0), (8, 1, 0)]
    # S = 2: [0,4) t1-t3, [2,6) t4-t5, [4,8) t6-t7, [6,10) t8-t9
    assert plan_windows(10, 4, 2, convention="hf") == [(0, 3, 0), (2, 3, 1), (4, 3, 1), (6, 3, 1)]
    # N = 9, L = 4, S = 4: the last window [8, 9) has one token and scores nothing (guide: NaN)
    assert plan_windows(9, 4, convention="hf") == [(0, 3, 0), (4, 3, 0)]
    with pytest.raises(ValueError, match="window convention"):
        plan_windows(10, 4, convention="gpt")


def test_eval_ppl_hf_folder_window_convention_hf(tmp_path, capsys):
    """tools/eval_ppl.py --load-format hf --window-convention hf on an HF folder == the guide's
    loop run with transformers' own model."""
    hf = _make_hf_folder(str(tmp_path / "hf"))
    docs = _tiny_docs(50, seed=2)
    _write_dataset(str(tmp_path / "val"), docs)
    stream = np.array(sum(docs, []), dtype=np.int64)
    want = _hf_guide_loop(hf, torch.as_tensor(stream)[None], 16, 5)
    import importlib.util
    spec = importlib.util.spec_from_file_location("eval_ppl", os.path.join(REPO, "tools",
                                                                           "eval_ppl.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--load-format", "hf", "--load", str(tmp_path / "hf"), "--data-path",
              str(tmp_path / "val"), "--seq-length", "16", "--stride", "5", "--json",
              "--window-convention", "hf"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["nll"] == pytest.approx(want, rel=1e-5)
    assert out["tokens"] == len(stream) - 1


# ---------------------------------------------------------------------------------------------
# Generation: sampling distribution by hand, greedy == HF generate, tools/generate.py end to end.
def test_top_p_top_k_probs_by_hand():
    from megatron_lite.eval.generation import top_p_top_k_probs

    p = torch.tensor([0.15, 0.5, 0.05, 0.3], dtype=torch.float64)
    logits = p.log()
    assert torch.allclose(top_p_top_k_probs(logits, top_p=0.7),
                          torch.tensor([0, 0.625, 0, 0.375], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(top_p_top_k_probs(logits, top_p=0.85),
                          torch.tensor([0.15, 0.5, 0, 0.3], dtype=torch.float64) / 0.95,
                          atol=1e-12)
    assert top_p_top_k_probs(logits, top_k=1).tolist() == [0, 1, 0, 0]
    assert torch.allclose(top_p_top_k_probs(logits, temperature=2.0), p.sqrt() / p.sqrt().sum(),
                          atol=1e-12)
    with pytest.raises(ValueError, match="--top-p"):
        top_p_top_k_probs(logits, top_p=0.0)


def test_greedy_generation_matches_hf_generate():
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_lite.eval.generation import generate
    from megatron_lite.eval.loading import LoadedModel

    torch.manual_seed(3)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)).eval()
    prompt = [5, 9, 13, 2]
    loaded = LoadedModel(hf, "hf", 40, 64)
    ours = generate(loaded.logits, prompt, 10, greedy=True)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert ours == ref and len(ours) == 10


def test_generate_tool_on_checkpoint(tmp_path, capsys):
    from tests.fixtures_data import TINY_VOCAB_SIZE, load_tool, make_tiny_corpus_and_tokenizer

    from megatron_lite.data.tokenizer import build_tokenizer
    from megatron_lite.checkpoint.weights import load_model_for_inference

    _, spm = make_tiny_corpus_and_tokenizer(tmp_path)
    save = str(tmp_path / "ckpt")
    _save_tiny_checkpoint(save, 1, vocab_size=TINY_VOCAB_SIZE,
                          tokenizer_type="SentencePieceTokenizer", tokenizer_model=spm)
    tool = load_tool("generate")
    common = ["--load", save, "--prompt", "def f(x):", "--max-new-tokens", "6",
              "--no-stop-at-eod", "--json"]
    tool.main(common + ["--greedy"])
    greedy = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Independent greedy loop on the same weights.
    tok = build_tokenizer("SentencePieceTokenizer", spm)
    model, _ = load_model_for_inference(save, 0, 1)
    ids = tok.encode("def f(x):")
    assert greedy["prompt_ids"] == ids
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1, :TINY_VOCAB_SIZE].argmax()))
    assert greedy["new_ids"] == ids[-6:]
    assert greedy["text"] == tok.decode([t for t in ids[-6:] if t != tok.eod])
    # Sampling: reproducible for a seed; top-k 1 is greedy.
    tool.main(common + ["--seed", "7", "--top-p", "0.9"])
    s1 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tool.main(common + ["--seed", "7", "--top-p", "0.9"])
    s2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s1["new_ids"] == s2["new_ids"]
    tool.main(common + ["--top-k", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["new_ids"] == \
        greedy["new_ids"]
