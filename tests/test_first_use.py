"""What a new user meets (issue 15): the project's own shipped files raise none of its own
warnings, outputs teammates read follow the umask, tools run without an activated venv, and
the small print/help details a first run shows."""

import glob
import json
import os
import subprocess
import sys
import warnings

import pytest

from megatron_lite.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_JSONS = sorted(glob.glob(os.path.join(ROOT, "configs", "deepspeed_zero*.json")))


@pytest.mark.parametrize("path", DS_JSONS, ids=os.path.basename)
def test_shipped_deepspeed_json_warns_nothing(path, monkeypatch):
    # The stage is the file's own, so the JSON and the flags agree as a user's run would.
    from megatron_lite.training.deepspeed_engine import build_ds_config, reconcile_user_json

    monkeypatch.chdir(ROOT)
    with open(path) as f:
        stage = json.load(f)["zero_optimization"]["stage"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config("configs/pretrain_7b_4k.yaml",
                          {"deepspeed_config": os.path.relpath(path, ROOT), "zero_stage": stage},
                          world_size=64)
        reconcile_user_json(cfg)
        build_ds_config(cfg)
    assert [str(w.message) for w in caught] == []
