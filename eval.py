"""Evaluate one or more mhc-lm models (or any Hugging Face causal LM) and compare them.

    python eval.py models=[runs/my-run]                          # its final model on the bundled corpus
    python eval.py models=[runs/a,runs/b] checkpoints=all          # every checkpoint of two runs
    python eval.py models=[runs/a/export,gpt2] data=local data.files=[corpus/*.txt] max_tokens=200000
    python eval.py models=[runs/a] lm_eval.tasks=[hellaswag] lm_eval.limit=200   # needs the `eval` extra

Reads top to bottom: validate the config and find every model before any work, then for each model:
load it, tokenize the split with the model's own tokenizer, the loss / perplexity / bits per byte on
a fixed token budget, the lm-evaluation-harness tasks, sample generations and their speed. Finally one
table (results.md, results.csv; a row per model with its run and residual variant), samples.md and a plot
of loss against tokens seen in the output directory (evals/<run_name>/). A whole sweep's training
metrics, over seeds, are `python -m mhc_lm.compare runs/sweeps/<name>`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mhc_lm.config import EvalConfig, register_configs, validate_eval
from mhc_lm.cli import reported, run
from mhc_lm.console import console_to_log, quiet_libraries
from mhc_lm.errors import ConfigError

register_configs()


def make_accelerator(precision: str):
    from accelerate import Accelerator

    from mhc_lm.training import resolve_precision

    precision = resolve_precision(precision)
    return Accelerator(mixed_precision="no" if precision == "fp32" else precision)


def check_lm_eval(cfg: EvalConfig):
    """The task manager for lm_eval.tasks (None when there are none); ConfigError when lm_eval is missing
    or a task is unknown."""
    tasks = list(cfg.lm_eval.tasks)
    if not tasks:
        return None
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"lm_eval.tasks={tasks}: lm-evaluation-harness is not installed; allowed: "
                          "pip install -e \".[eval]\", or lm_eval.tasks=[]")
    from mhc_lm.evaluation import lm_eval_task_manager

    try:
        return lm_eval_task_manager(tasks, cfg.lm_eval.include_path)
    except KeyError as err:
        raise ConfigError(f"lm_eval.tasks={tasks}: unknown task(s) {err.args[0]}; allowed: lm_eval's task names "
                          "(lm_eval ls tasks) or tasks in lm_eval.include_path") from None


def check_context(seq_len: int, label: str, context: int | None) -> None:
    if context is not None and seq_len > context:
        raise ConfigError(f"data.seq_len={seq_len}: longer than the context of {label} ({context}); "
                          f"allowed: <= {context}")


def evaluate(cfg: EvalConfig, out_dir: Path) -> list[dict]:
    from mhc_lm.data import prepare_data
    from mhc_lm.evaluation import (markdown_table, plot_loss_vs_tokens, run_lm_eval, sample_generations, split_loss,
                                   write_table)
    from mhc_lm.model_sources import load_source, local_context, resolve_sources
    from mhc_lm.training import autocast_dtype

    # 1. Everything that can be checked without loading a model.
    validate_eval(cfg)
    quiet_libraries()
    sources = [s for spec in cfg.models for s in resolve_sources(spec, cfg.checkpoints)]
    for source in sources:
        check_context(cfg.data.seq_len, source.label, local_context(source))
    task_manager = check_lm_eval(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    accelerator = make_accelerator(cfg.precision)
    is_main = accelerator.is_main_process
    half = autocast_dtype(accelerator.mixed_precision)
    accelerator.print(f"Evaluating {len(sources)} model(s): {', '.join(s.label for s in sources)}")

    rows, samples = [], []
    for source in sources:
        # 2. The model, and the split in its own tokenizer (cached by data.prepare_data).
        model, tokenizer = load_source(source, cfg.trust_remote_code)
        check_context(cfg.data.seq_len, source.label, model.config.max_position_embeddings)
        model.to(accelerator.device)
        data = prepare_data(dataclasses.replace(cfg.data, tokenizer=tokenizer.name_or_path))
        row = {"model": source.label, "run": source.run_dir.name if source.run_dir is not None else None,
               "residual": residual_name(model), "kind": source.kind, "step": source.step,
               "tokens_seen": source.tokens_seen, "params": sum(p.numel() for p in model.parameters())}

        # 3. Loss, perplexity and bits per byte on a fixed token budget.
        row.update(split_loss(model, tokenizer, getattr(data, cfg.split), cfg.data.seq_len, cfg.batch_size,
                              cfg.max_tokens, accelerator))

        # 4. lm-evaluation-harness tasks and sample generations (main process).
        if is_main and task_manager is not None:
            lm = cfg.lm_eval
            row.update(run_lm_eval(model, tokenizer, list(lm.tasks), task_manager, lm.batch_size, lm.num_fewshot,
                                   lm.limit, lm.seed, half))
        if is_main and cfg.generate.prompts:
            gen = cfg.generate
            made, tokens_per_s = sample_generations(model, tokenizer, list(gen.prompts), gen.max_new_tokens,
                                                    gen.temperature, gen.top_k, gen.seed, accelerator)
            samples += [{"model": source.label, **s} for s in made]
            row["gen_tokens_per_s"] = tokens_per_s
        rows.append(row)
        accelerator.print(f"{source.label}: loss {row['loss']:.4f} | ppl {row['ppl']:.2f} | "
                          f"bits/byte {row['bits_per_byte']:.4f} over {row['eval_tokens']:,} tokens")
        del model

    # 5. One table, the samples and one plot for all models.
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        md, csv_path = write_table(rows, out_dir)
        (out_dir / "results.json").write_text(json.dumps(rows, indent=2))
        write_samples(samples, out_dir)
        plot = plot_loss_vs_tokens(rows, sources, out_dir, cfg.max_tokens)
        print("\n" + markdown_table(rows))
        plotted = f" | plot: {plot}" if plot else ""
        print(f"results: {md}, {csv_path}{plotted} | samples: {out_dir / 'samples.md'}")
    accelerator.end_training()
    return rows


def residual_name(model) -> str | None:
    """The residual variant of an mhc-lm model (its config's `residual`), None for other models."""
    residual = getattr(model.config, "residual", None)
    return residual.get("name") if isinstance(residual, dict) else None


def write_samples(samples: list[dict], out_dir: Path) -> None:
    with open(out_dir / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    lines = []
    for s in samples:
        lines += [f"### {s['model']}: {s['prompt']!r} ({s['new_tokens']} tokens, {s['tokens_per_s']:,.0f} tokens/s)",
                  "", "```", s["prompt"] + s["completion"], "```", ""]
    (out_dir / "samples.md").write_text("\n".join(lines))


@hydra.main(version_base=None, config_path="conf", config_name="eval")
def main(dict_cfg: DictConfig) -> None:
    cfg: EvalConfig = OmegaConf.to_object(dict_cfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    with console_to_log(), reported(out_dir):
        evaluate(cfg, out_dir)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(main, "eval", check=validate_eval, output_option="output_dir")  # Hydra's errors in one line, exit 2
