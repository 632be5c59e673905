"""Tokenize a data source once into memory-mapped shards:

    python -m mhc_lm.data prepare DATA_CONFIG --out DIR [data.KEY=VALUE ...] [--shard-tokens N] [--max-tokens N]

DATA_CONFIG is a group of conf/data (bundled, local, hub), composed with Hydra exactly as
`python train.py data=DATA_CONFIG data.KEY=VALUE` would, or a YAML file with the keys of such a group
(the overrides then apply on top of it). Then train with `python train.py data=shards data.dir=DIR`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from ..config import CONF_DIR, compose_config
from ..errors import ConfigError
from .config import DataConfig
from .prepare import documents_for_prepare
from .shards import write_shards
from .sources import validate_data

def compose_data_config(spec: str, overrides: list[str]):
    """The DataConfig of a conf/data group name or a YAML file, with `data.KEY=VALUE` overrides."""
    for override in overrides:
        if not override.lstrip("+~").startswith("data."):
            raise ConfigError(f"{override}: prepare takes data options only; allowed: data.KEY=VALUE")
    if spec.endswith((".yaml", ".yml")) or os.path.isfile(spec):
        if not os.path.isfile(spec):
            raise ConfigError(f"DATA_CONFIG={spec!r}: no such file; allowed: a data group or a YAML file")
        dotlist = [o.lstrip("+")[len("data."):] for o in overrides]
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(spec), OmegaConf.from_dotlist(dotlist))
        return OmegaConf.to_object(merged)
    groups = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml") if p.stem != "shards")
    if spec not in groups:
        raise ConfigError(f"DATA_CONFIG={spec!r}: no such data group or file; allowed: {', '.join(groups)}, "
                          "or a YAML file")
    return compose_config([f"data={spec}", "trainer.run_name=prepare", *overrides]).data


def prepare(args) -> str:
    data = compose_data_config(args.config, args.overrides)
    validate_data(data, data.seq_len)
    for option in ("shard_tokens", "max_tokens"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ConfigError(f"--{option.replace('_', '-')}={value}: allowed: a number >= 1")
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out={args.out!r}: exists and is not empty; allowed: a new or empty directory")
    tokenizer, splits = documents_for_prepare(data)
    manifest = write_shards(str(out), tokenizer, splits, asdict(data), args.shard_tokens, args.max_tokens)
    train, val = manifest["splits"]["train"], manifest["splits"]["validation"]
    return (f"wrote {train['tokens']:,} train tokens ({train['documents']:,} documents, {len(train['shards'])} "
            f"shard(s)) and {val['tokens']:,} validation tokens to {out} | {manifest['tokens_per_s']:,} tokens/s\n"
            f"train with: python train.py data=shards data.dir={out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mhc_lm.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["prepare"],
                        help="prepare: tokenize a data source into memory-mapped shards with a manifest")
    parser.add_argument("config", metavar="DATA_CONFIG", help="a conf/data group (bundled, local, hub) or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE", help="overrides, as for train.py")
    parser.add_argument("--out", required=True, help="the directory to write (new or empty)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default 1e8)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="stop the train split at the first document end after this many tokens")
    args = parser.parse_intermixed_args(argv)
    try:
        print(prepare(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
