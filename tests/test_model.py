"""The GPT: HC-at-init equals the residual model, KV-cache generation, masks, GQA, save/load round trips."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mhc_lm.model import CACHE_KEY, MhcConfig, MhcForCausalLM

RESIDUALS = {
    "residual": {"name": "residual", "n": 1, "collapse": "sum"},
    "hc": {"name": "hc", "n": 4, "collapse": "mean"},
    "mhc": {"name": "mhc", "n": 4, "collapse": "head"},
}


def tiny(residual: dict, **overrides) -> MhcForCausalLM:
    options = {"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 64, **overrides}
    return MhcForCausalLM(MhcConfig(residual=residual, **options)).eval()


def test_hc_at_init_equals_the_pre_norm_residual_model():
    torch.manual_seed(0)
    residual_model = tiny(RESIDUALS["residual"]).double()
    hc_model = tiny(RESIDUALS["hc"]).double()
    missing, unexpected = hc_model.load_state_dict(residual_model.state_dict(), strict=False)
    assert not unexpected and all("_hc." in k for k in missing)  # only the HC parameters are new
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hc_model(ids).logits, residual_model(ids).logits, rtol=0, atol=1e-12)


def test_hc_off_its_init_differs_from_residual():
    """A control for the test above: the same comparison tells a non-identity HC apart."""
    torch.manual_seed(0)
    residual_model = tiny(RESIDUALS["residual"])
    hc_model = tiny(RESIDUALS["hc"])
    hc_model.load_state_dict(residual_model.state_dict(), strict=False)
    with torch.no_grad():
        hc_model.model.layers[0].attn_hc.static_post.copy_(torch.tensor([1.0, 0.0, 0.5, 2.0]))
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert (hc_model(ids).logits - residual_model(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(RESIDUALS))
def test_generate_with_kv_cache_equals_full_recompute(name):
    torch.manual_seed(1)
    model = tiny(RESIDUALS[name])
    prompt = torch.randint(0, 97, (2, 5))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                         pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_cached_logits_equal_uncached():
    torch.manual_seed(2)
    model = tiny(RESIDUALS["mhc"])
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :7], use_cache=True)
        rest = model(ids[:, 7:], use_cache=True, **{CACHE_KEY: first[CACHE_KEY]})  # a chunk, not one token
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_mask_gives_the_unpadded_logits():
    torch.manual_seed(3)
    model = tiny(RESIDUALS["mhc"])
    ids = torch.randint(1, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    positions = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.arange(6).unsqueeze(0)], 1)
    with torch.no_grad():
        plain = model(ids).logits
        masked = model(padded, attention_mask=mask, position_ids=positions).logits[:, 3:]
    assert torch.isfinite(masked).all()
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_equals_repeated_heads():
    """GQA with 2 K/V heads equals MHA whose 4 K/V heads repeat each shared head."""
    torch.manual_seed(4)
    gqa = tiny(RESIDUALS["residual"])
    mha = tiny(RESIDUALS["residual"], num_key_value_heads=4)
    state = gqa.state_dict()
    head_dim = 8
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = state[key].view(2, head_dim, -1).repeat_interleave(2, 0).reshape(4 * head_dim, -1)
    mha.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids).logits, mha(ids).logits, atol=1e-5, rtol=1e-5)


def test_causality():
    torch.manual_seed(5)
    model = tiny(RESIDUALS["mhc"])
    ids = torch.randint(0, 97, (1, 10))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 97
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-4


def test_labels_loss_is_the_shifted_cross_entropy():
    model = tiny(RESIDUALS["mhc"])
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_context_length_is_enforced():
    model = tiny(RESIDUALS["residual"])
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(RESIDUALS))
def test_save_then_auto_from_pretrained_gives_identical_logits(name, tmp_path):
    torch.manual_seed(6)
    model = tiny(RESIDUALS[name])
    with torch.no_grad():  # move off the init so a silent re-initialization on load would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).residual == RESIDUALS[name]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MhcForCausalLM)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_tied_embeddings():
    tied = tiny(RESIDUALS["mhc"])
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = tiny(RESIDUALS["mhc"], tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
