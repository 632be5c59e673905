"""mhc-lm: pretrain GPT-style language models with manifold-constrained hyper-connections."""

__version__ = "0.1.0"
