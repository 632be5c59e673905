"""Loads tiny_sequences.jsonl from this folder, wherever lm_eval is run from (a relative data_files
path in the YAML would be read from the current directory)."""

from pathlib import Path


def load(**_metadata):
    from datasets import load_dataset

    return load_dataset("json", data_files={"test": str(Path(__file__).with_suffix(".jsonl"))})
