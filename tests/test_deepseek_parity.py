"""Our mhc mixer and HyperHead give what `transformers`' DeepSeek-V4 modules give, on the same weights."""

from __future__ import annotations

import pytest
import torch

from mhc_lm.residual import HyperHead, make_mixer

ds = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
DeepseekV4Config = pytest.importorskip("transformers").DeepseekV4Config

N, C = 4, 32


def v4_config(iters: int = 20):
    return DeepseekV4Config(hidden_size=C, hc_mult=N, hc_sinkhorn_iters=iters, hc_eps=1e-6, rms_norm_eps=1e-6)


def random_weights(module, names):
    torch.manual_seed(0)
    with torch.no_grad():
        for name in names:
            param = getattr(module, name)
            param.copy_(torch.randn_like(param) * (0.5 if name != "fn" and name != "hc_fn" else 0.05))


@pytest.mark.parametrize("iters", [1, 20])
def test_hyper_connection_parity(iters):
    theirs = v4_config(iters)
    ref = ds.DeepseekV4HyperConnection(theirs)
    random_weights(ref, ["fn", "base", "scale"])
    ours = make_mixer("mhc", C, N, 0, sinkhorn_iters=iters)
    ours.load_state_dict(ref.state_dict())  # the same names and layout: no conversion
    streams = torch.randn(2, 9, N, C) * 2

    post_ref, comb_ref, collapsed_ref = ref(streams)
    h_pre, h_post, h_res = ours.coefficients(streams)
    torch.testing.assert_close(h_post, post_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_res.transpose(-1, -2), comb_ref, atol=1e-5, rtol=1e-5)
    collapsed = (h_pre.unsqueeze(-1) * streams).sum(-2)
    torch.testing.assert_close(collapsed, collapsed_ref, atol=1e-5, rtol=1e-5)

    # The full sublayer update, as DeepseekV4DecoderLayer writes it, against our mixer.
    branch = torch.nn.Linear(C, C)
    expected = post_ref.unsqueeze(-1) * branch(collapsed_ref).unsqueeze(-2) + torch.matmul(
        comb_ref.transpose(-1, -2), streams)
    torch.testing.assert_close(ours(streams, branch), expected, atol=1e-5, rtol=1e-5)


def test_hyper_head_parity():
    ref = ds.DeepseekV4HyperHead(v4_config())
    random_weights(ref, ["hc_fn", "hc_base", "hc_scale"])
    ours = HyperHead(C, N, eps=1e-6, rms_eps=1e-6)
    ours.load_state_dict(ref.state_dict())
    streams = torch.randn(3, 5, N, C)
    torch.testing.assert_close(ours(streams), ref(streams), atol=1e-5, rtol=1e-5)
