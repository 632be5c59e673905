"""Cached generation is right whatever transformers calls the KV cache (`cache` or `past_key_values`).

The scores `generate` computes with its KV cache must equal the logits of one full forward over the
finished sequences, for a batch with left padding; in the package and in the exported remote-code
bundle (loaded where mhc_lm is not importable), and without transformers' deprecation warnings.
"""

from __future__ import annotations

import logging
import textwrap

import pytest
import torch

from mhc_lm.export import bundle_modeling_code
from mhc_lm.model import MhcConfig, MhcForCausalLM
from test_export import isolated_python

pytestmark = pytest.mark.compat  # also run against the newest transformers by .ci/run's drift job

RESIDUALS = {
    "residual": {"name": "residual", "n": 1, "collapse": "sum"},
    "hc": {"name": "hc", "n": 4, "collapse": "mean"},
    "mhc": {"name": "mhc", "n": 4, "collapse": "head"},
}

# The check itself, as source text: it runs here on mhc_lm's model and in an isolated Python on the
# exported bundle. Returns (relative error of the cached scores, largest logit change without context).
CHECK = textwrap.dedent("""
    import torch

    def cached_vs_full(model, new_tokens=8):
        ids = torch.tensor([[0, 0, 0, 11, 52, 7, 33], [5, 17, 3, 80, 42, 7, 61]])  # row 0: left padding
        mask = (torch.arange(7) >= torch.tensor([[3], [0]])).long()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=0)
            scores = torch.stack(out.logits, 1)  # (B, new_tokens, V), raw logits of each cached step
            full_mask = torch.cat([mask, torch.ones(2, new_tokens, dtype=torch.long)], 1)
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            full = model(out.sequences, attention_mask=full_mask, position_ids=positions).logits
            reference = full[:, ids.shape[1] - 1:-1]  # the logits that chose each new token
            # the same last tokens without their context: how much the context moves the logits
            alone = model(out.sequences[:, -new_tokens - 1:-1].reshape(-1, 1),
                          position_ids=positions[:, -new_tokens - 1:-1].reshape(-1, 1)).logits
        error = ((scores - reference).abs().max() / reference.abs().max()).item()
        context = (alone.reshape(reference.shape) - reference).abs().max().item()
        return error, context
""")
namespace: dict = {}
exec(CHECK, namespace)
cached_vs_full = namespace["cached_vs_full"]


def context_sensitive_model(name: str) -> MhcForCausalLM:
    """A random model whose weights (std 0.3) make every logit depend strongly on the context."""
    torch.manual_seed(0)
    config = MhcConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, initializer_range=0.3, residual=RESIDUALS[name],
                       eos_token_id=1, pad_token_id=0, bos_token_id=1)
    return MhcForCausalLM(config).eval()


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """The warnings transformers logs during a test (its warning_once cache cleared first)."""
    logging.Logger.warning_once.cache_clear()
    recorder = Recorder()
    logger = logging.getLogger("transformers")
    logger.addHandler(recorder)
    yield recorder.messages
    logger.removeHandler(recorder)


@pytest.mark.parametrize("name", list(RESIDUALS))
def test_cached_greedy_scores_equal_a_full_forward(name, transformers_warnings):
    error, context = cached_vs_full(context_sensitive_model(name))
    assert context > 1.0, "the test model must make the context matter, or a cache bug would go unseen"
    assert error <= 1e-5
    assert not [m for m in transformers_warnings if "deprecated" in m], transformers_warnings


def test_the_exported_bundle_generates_with_the_cache(tmp_path):
    """The remote-code copy of the model, loaded where mhc_lm is not importable, passes the same check."""
    exports = []
    for name in RESIDUALS:
        folder = tmp_path / name
        context_sensitive_model(name).save_pretrained(folder)
        bundle_modeling_code(folder, "MhcConfig", "MhcForCausalLM")
        exports.append(str(folder))
    script = CHECK + textwrap.dedent(f"""
        import importlib.util, logging
        assert importlib.util.find_spec("mhc_lm") is None, "mhc_lm is importable"
        torch.set_num_threads(1)
        from transformers import AutoModelForCausalLM
        seen = []
        class Recorder(logging.Handler):
            def emit(self, record):
                seen.append(record.getMessage())
        logging.getLogger("transformers").addHandler(Recorder(logging.WARNING))
        for folder in {exports!r}:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            print(*cached_vs_full(model))
        print("deprecated" in " ".join(seen))
    """)
    result = isolated_python(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    *rows, deprecated = result.stdout.split("\n")[-len(RESIDUALS) - 2:-1]
    for row in rows:
        error, context = map(float, row.split())
        assert context > 1.0 and error <= 1e-5, row
    assert deprecated == "False"
