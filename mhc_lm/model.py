"""A GPT (RMSNorm, RoPE, SwiGLU, SDPA attention, optional GQA and tied embeddings) whose residual
path is a selectable mixer from `mhc_lm.residual`.

Built as a `transformers` model (`MhcConfig`, `MhcForCausalLM`) registered with AutoConfig and
AutoModelForCausalLM, so `save_pretrained`, `from_pretrained` and `generate` (KV cache) work.
This file knows nothing of training.

Layout: the token embedding is copied into n streams (B, T, n, C); each block has two sublayers,
attention and MLP, each wrapped by its own mixer (`attn_hc`, `mlp_hc`); the streams are collapsed
(`hc_head` or sum/mean) before the final norm and the LM head.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .residual import Mixer, expand_streams, make_collapse, make_mixer, mixer_options
from .residual.collapse import HyperHead
from .residual.recompute import check_policy, paper_group, run_branch, run_stages

DEFAULT_RESIDUAL = {"name": "mhc", "n": 4, "collapse": "head"}

# The keyword under which `generate` hands the KV cache to `forward` and reads it back from the output:
# `cache` in newer transformers (which deprecate `past_key_values` and warn on it), `past_key_values` before.
# The forwards below accept both, and the output carries the cache under the installed version's name.
CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class MhcConfig(PretrainedConfig):
    """Architecture of an mhc-lm GPT. `residual` holds the mixer name, n, collapse mode and the
    variant's options (exactly the `residual` group of the training config)."""

    model_type = "mhc_gpt"
    attribute_map = {
        "d_model": "hidden_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "n_kv_heads": "num_key_value_heads",
        "ffn_hidden": "intermediate_size",
        "max_seq_len": "max_position_embeddings",
    }

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 1024,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        residual: dict[str, Any] | None = None,
        activation_checkpointing: str = "none",
        recompute_group: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = 0,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size or swiglu_hidden(hidden_size)
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.residual = dict(residual if residual is not None else DEFAULT_RESIDUAL)
        check_policy(activation_checkpointing, recompute_group)
        self.activation_checkpointing = activation_checkpointing  # none | mhc | full (mhc_lm.residual.recompute)
        self.recompute_group = recompute_group  # sublayers per `mhc` group; None: the paper's rule
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_streams(self) -> int:
        return int(self.residual.get("n", 1))

    @property
    def group_size(self) -> int:
        """L_r, the sublayers per `mhc` recompute group (attention and MLP count apart)."""
        return self.recompute_group or paper_group(self.num_streams, 2 * self.num_hidden_layers)

    @property
    def blocks_per_group(self) -> int:
        """L_r in whole blocks (two sublayers each, rounded up): a group never splits a block, so the
        per-block hooks of FSDP and ZeRO-3 see every block whole, also when it runs again in backward."""
        return math.ceil(self.group_size / 2)


def swiglu_hidden(dim: int, multiple_of: int = 64) -> int:
    """The LLaMA rule: 8/3 * dim, rounded up to a multiple (keeps SwiGLU at about 12 * dim^2 per block)."""
    return multiple_of * math.ceil(int(8 * dim / 3) / multiple_of)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T). Computed on the fly (no buffers)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq  # (B, T, head_dim / 2)
    angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on (B, H, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def attention_mask_4d(attention_mask: torch.Tensor | None, q_len: int, past_len: int, device) -> torch.Tensor | None:
    """Boolean (B, 1, q_len, past_len + q_len) mask, or None where plain causal SDPA suffices.

    A query always sees itself, so rows of padding tokens never turn into NaN.
    """
    kv_len = past_len + q_len
    has_padding = attention_mask is not None and not bool(attention_mask[:, -kv_len:].all())
    if not has_padding and (past_len == 0 or q_len == 1):
        return None
    q_pos = torch.arange(past_len, kv_len, device=device).unsqueeze(-1)
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    mask = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0)  # (1, 1, q, kv)
    if has_padding:
        keys = attention_mask[:, -kv_len:].bool()[:, None, None, :]
        mask = (mask & keys) | (k_pos == q_pos)
    return mask


class Attention(nn.Module):
    def __init__(self, config: MhcConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: Cache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: share each K/V head
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        is_causal = mask is None and T > 1 and k.shape[2] == T
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: MhcConfig):
        super().__init__()
        dim, hidden = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Two sublayers, each pre-normed and wrapped by its own residual mixer."""

    def __init__(self, config: MhcConfig, layer_idx: int):
        super().__init__()
        residual = config.residual
        n, name, options = config.num_streams, residual["name"], mixer_options(residual)
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.attn_hc = make_mixer(name, config.hidden_size, n, 2 * layer_idx, **options)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config)
        self.mlp_hc = make_mixer(name, config.hidden_size, n, 2 * layer_idx + 1, **options)

    def forward(self, streams, cos, sin, mask, cache):
        # run_branch: under `mhc` recompute the layers after the norm keep their activations and are never
        # rerun; the norm is recomputed with the mixer's glue (mhc_lm.residual.recompute).
        streams = self.attn_hc(streams, lambda x: run_branch(self.attn, self.attn_norm(x), cos, sin, mask, cache))
        return self.mlp_hc(streams, lambda x: run_branch(self.mlp, self.mlp_norm(x)))


class MhcPreTrainedModel(PreTrainedModel):
    config_class = MhcConfig
    config: MhcConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                    every_n_layers: int = 1):
        """`gradient_checkpointing_enable()` (the transformers convention) sets `full`; disable sets `none`.
        Blocks always go through torch's non-reentrant checkpoint (`mhc_lm.residual.recompute`)."""
        self.config.activation_checkpointing = "full" if enable else "none"

    @property
    def gradient_checkpointing(self) -> bool:  # what transformers' `is_activation_checkpointing` reads
        return self.config.activation_checkpointing != "none"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        from transformers import initialization as init

        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # GPT-2: projections that write into the residual stream get std / sqrt(2 * layers).
            out_proj = getattr(module, "_is_residual_out", False)
            scaled = std / math.sqrt(2 * self.config.num_hidden_layers) if out_proj else std
            init.normal_(module.weight, mean=0.0, std=scaled)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, (Mixer, HyperHead)):
            module.reset_parameters()


class MhcModel(MhcPreTrainedModel):
    def __init__(self, config: MhcConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        for block in self.layers:
            block.attn.o_proj._is_residual_out = True
            block.mlp.down_proj._is_residual_out = True
        residual = config.residual
        self.hc_head = make_collapse(residual.get("collapse", "head"), config.hidden_size, config.num_streams,
                                     eps=residual.get("collapse_eps", 1e-6))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, use_cache=None, past_key_values: Cache | None = None, **kwargs):
        """Final hidden states (B, T, C) and the KV cache (None without one). The cache comes as `cache` or,
        from older transformers, `past_key_values` (see CACHE_KEY)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = hidden.shape
        if use_cache and cache is None:
            cache = DynamicCache()
        past_len = cache.get_seq_length() if cache is not None else 0
        if past_len + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {past_len + T} tokens exceeds the model's context "
                f"max_seq_len={self.config.max_position_embeddings}"
            )
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=hidden.device).unsqueeze(0).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        cos, sin = cos.to(hidden.dtype), sin.to(hidden.dtype)
        mask = attention_mask_4d(attention_mask, T, past_len, hidden.device)
        streams = expand_streams(hidden, self.config.num_streams)  # (B, T, n, C)
        blocks = [functools.partial(block, cos=cos, sin=sin, mask=mask, cache=cache) for block in self.layers]
        streams = run_stages(blocks, streams, self.recompute_policy(cache), self.config.blocks_per_group)
        return self.norm(self.hc_head(streams)), cache

    def recompute_policy(self, cache) -> str:
        """The configured policy where a backward can follow (training, grad on, no KV cache), else `none`:
        evaluation, generation and the diagnostics probe never recompute."""
        if self.training and torch.is_grad_enabled() and cache is None:
            return self.config.activation_checkpointing
        return "none"


class MhcForCausalLM(MhcPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MhcConfig):
        super().__init__(config)
        self.model = MhcModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                past_key_values: Cache | None = None, **kwargs):
        """Logits (B, T, V); with `labels` (aligned with input_ids, -100 ignored) also the mean next-token loss.

        The KV cache comes as `cache` or `past_key_values`, whichever the installed transformers passes, and
        goes back under that version's name (CACHE_KEY), so `generate` finds it.
        """
        hidden, cache = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache,
                                   past_key_values=past_key_values)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KEY: cache if use_cache else None})


AutoConfig.register(MhcConfig.model_type, MhcConfig, exist_ok=True)
AutoModelForCausalLM.register(MhcConfig, MhcForCausalLM, exist_ok=True)


def build_config(model_cfg, residual: dict[str, Any], vocab_size: int, eos_token_id: int | None,
                 trainer_cfg=None) -> MhcConfig:
    """An `MhcConfig` from the training config's `model` section (a `ModelConfig`) and `residual` group; the
    `trainer` section (a `TrainerConfig`), where given, sets the activation recompute."""
    recompute = {} if trainer_cfg is None else {"activation_checkpointing": trainer_cfg.activation_checkpointing,
                                                "recompute_group": trainer_cfg.recompute_group}
    return MhcConfig(
        vocab_size=vocab_size,
        hidden_size=model_cfg.d_model,
        num_hidden_layers=model_cfg.n_layers,
        num_attention_heads=model_cfg.n_heads,
        num_key_value_heads=model_cfg.n_kv_heads,
        intermediate_size=model_cfg.ffn_hidden,
        max_position_embeddings=model_cfg.max_seq_len,
        rope_theta=model_cfg.rope_theta,
        rms_norm_eps=model_cfg.norm_eps,
        initializer_range=model_cfg.init_std,
        tie_word_embeddings=model_cfg.tie_embeddings,
        residual=dict(residual),
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        **recompute,
    )
