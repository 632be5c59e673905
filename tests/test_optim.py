"""Parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest

from mhc_lm.config import OptimConfig
from mhc_lm.model import MhcConfig, MhcForCausalLM
from mhc_lm.optim import build_optimizer, lr_at, param_groups


def test_no_weight_decay_on_norms_biases_or_connection_parameters():
    model = MhcForCausalLM(MhcConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     max_position_embeddings=32, residual={"name": "mhc", "n": 4}))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "model.layers.0.attn_hc.fn" in exempt  # 2-D, but a connection parameter
    assert "model.hc_head.hc_fn" in exempt
    assert "model.layers.0.attn_norm.weight" in exempt
    assert "model.layers.1.mlp.down_proj.weight" in decayed
    assert "model.embed_tokens.weight" in decayed
    assert not any(k.endswith(("fn", "base", "scale")) for k in decayed)
    assert decayed.isdisjoint(exempt) and len(decayed | exempt) == len(names)


def test_optimizer_has_both_groups():
    model = MhcForCausalLM(MhcConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     max_position_embeddings=32))
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.05))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_cosine_schedule_values():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    assert lr_at(500, cfg, 110) == pytest.approx(0.1)  # past the end: stays at the floor


def test_wsd_schedule_values():
    cfg = OptimConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert lr_at(5, cfg, 100) == pytest.approx(2.0 * 6 / 10)
    assert lr_at(79, cfg, 100) == pytest.approx(2.0)  # stable until 80% of the steps
    assert lr_at(90, cfg, 100) == pytest.approx(1.0)  # halfway down the linear decay
    assert lr_at(100, cfg, 100) == pytest.approx(0.0)


def test_constant_schedule_and_purity():
    cfg = OptimConfig(lr=0.5, warmup_steps=0, schedule="constant")
    assert [lr_at(s, cfg, 10) for s in (0, 5, 9)] == [0.5, 0.5, 0.5]
    # Cosine with floor 0.1 over 40 steps after a warmup of 3: by hand, lr = 0.1 + 0.45 * (1 + cos(pi * p)).
    cosine = OptimConfig(lr=1.0, warmup_steps=3)
    by_hand = {0: 1 / 3, 1: 2 / 3, 2: 1.0, 3: 1.0, 13: 0.868198, 23: 0.55, 33: 0.231802, 43: 0.1, 60: 0.1}
    # Pure: asked in any order, even backwards, the value depends on the step alone.
    for order in (sorted(by_hand), sorted(by_hand, reverse=True)):
        assert {s: lr_at(s, cosine, 43) for s in order} == pytest.approx(by_hand, abs=1e-6)
