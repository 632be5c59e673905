"""What eval.py measures on one model, and how it reports several.

- `split_loss`: next-token loss, perplexity and bits per byte on the first `max_tokens` tokens of a
  split (whole blocks of seq_len), through `metrics.evaluate_loss` on `data.eval_batches`.
- `run_lm_eval`: lm-evaluation-harness tasks on the loaded model (its HFLM wrapper), when installed.
- `sample_generations`: prompts continued with `generate` (KV cache), and the decoding speed.
- `write_table` (through `tables`), `plot_loss_vs_tokens`: every model in one Markdown/CSV table and one plot (eval.py's loss
  and train.py's validation loss in separate panels: their token budgets differ).

Bits per byte. The targets of the evaluated blocks are one contiguous run of the token stream
(blocks overlap by one token), so their text is decoded once: bytes = the UTF-8 length of
`tokenizer.decode(targets, skip_special_tokens=True)`. End-of-text tokens are predicted (their loss
counts) but are no text (0 bytes). bits/byte = (sum of token losses in nats) / (ln 2 * bytes), so
models with different tokenizers compare on the same text.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .console import quiet_lm_eval
from .data import eval_batches, num_blocks
from .metrics import evaluate_loss, perplexity
from .run_dir import RunDir
from .tables import markdown_table, write_csv


# ---------------------------------------------------------------------------------------------
# Loss, perplexity, bits per byte


def evaluated_tokens(tokens: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
    """The start of the split that the loss covers: whole blocks, at most max_tokens targets (plus one input)."""
    blocks = min(num_blocks(tokens, seq_len), max_tokens // seq_len)
    return np.asarray(tokens[: blocks * seq_len + 1])


def utf8_bytes(tokenizer, ids: Iterable[int]) -> int:
    """Bytes of the text that `ids` decode to, special tokens (end-of-text) excluded."""
    text = tokenizer.decode(list(map(int, ids)), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return len(text.encode("utf-8"))


def split_loss(model, tokenizer, tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int,
               accelerator) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte on the first max_tokens tokens of `tokens`."""
    from tqdm.auto import tqdm

    window = evaluated_tokens(tokens, seq_len, max_tokens)
    blocks = num_blocks(window, seq_len)
    batches = eval_batches(window, seq_len, batch_size, math.ceil(blocks / batch_size),
                           accelerator.process_index, accelerator.num_processes)
    total = math.ceil(blocks / (batch_size * accelerator.num_processes))
    progress = tqdm(batches, total=total, desc="Loss", unit="batch", disable=not accelerator.is_main_process)
    loss = evaluate_loss(model, progress, accelerator)
    n_tokens, n_bytes = blocks * seq_len, utf8_bytes(tokenizer, window[1:])
    return {"loss": loss, "ppl": perplexity(loss), "bits_per_byte": loss * n_tokens / (math.log(2) * n_bytes),
            "eval_tokens": n_tokens, "eval_bytes": n_bytes}


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness


def lm_eval_task_manager(tasks: list[str], include_path: str | None):
    """A TaskManager that knows `tasks`: the include_path alone when it has them all (indexing the
    built-in tasks takes seconds), else with the built-in tasks. Raises KeyError naming unknown tasks."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise KeyError(", ".join(unknown))
    return manager


def run_lm_eval(model, tokenizer, tasks: list[str], task_manager, batch_size: int, num_fewshot=None, limit=None,
                seed: int = 0, mixed_precision_dtype=None) -> dict[str, float]:
    """Task metrics as {"task/metric": value} from lm_eval's simple_evaluate on our loaded model."""
    import lm_eval.evaluator  # noqa: F401  (its modules' loggers exist before quiet_lm_eval looks for them)
    from lm_eval.models.huggingface import HFLM

    with quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                  max_length=model.config.max_position_embeddings, mixed_precision_dtype=mixed_precision_dtype)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager,
                                      num_fewshot=num_fewshot, limit=limit, log_samples=False, bootstrap_iters=0,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    metrics = {}
    for task, values in out["results"].items():
        for key, value in values.items():  # metrics are "name,filter": "acc,none", "acc_stderr,none"
            name = key.split(",")[0]
            if "," in key and isinstance(value, (int, float)) and not name.endswith("_stderr"):
                metrics[f"{task}/{name}"] = float(value)
    return metrics


# ---------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def sample_generations(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
                       top_k: int | None, seed: int, accelerator) -> tuple[list[dict[str, Any]], float]:
    """Each prompt continued with `generate` (KV cache on); returns the samples and new tokens per second."""
    samples, new_tokens, seconds = [], 0, 0.0
    context = model.config.max_position_embeddings
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        if ids.shape[1] == 0:  # an empty prompt starts a document
            ids = torch.tensor([[tokenizer.eos_token_id]])
        ids = ids[:, -context + 1:].to(accelerator.device)
        budget = min(max_new_tokens, context - ids.shape[1])
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k} if temperature > 0 else \
            {"do_sample": False}
        started = time.perf_counter()
        with accelerator.autocast():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, use_cache=True,
                                 pad_token_id=tokenizer.eos_token_id, **sampling)
        elapsed = time.perf_counter() - started
        generated = out[0, ids.shape[1]:]
        new_tokens += len(generated)
        seconds += elapsed
        samples.append({"prompt": prompt, "completion": tokenizer.decode(generated, skip_special_tokens=False),
                        "new_tokens": len(generated), "tokens_per_s": len(generated) / elapsed})
    return samples, (new_tokens / seconds if seconds else float("nan"))


# ---------------------------------------------------------------------------------------------
# Reports


def write_table(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """results.md and results.csv, one row per model, in the same columns."""
    md, csv_path = out_dir / "results.md", out_dir / "results.csv"
    md.write_text(markdown_table(rows))
    write_csv(rows, csv_path)
    return md, csv_path


def training_curve(run_dir: Path) -> tuple[list[float], list[float]]:
    """(tokens seen, validation loss) as logged by train.py in RUN/metrics.jsonl (`compare.read_run`: tokens
    are logged with the training metrics, every log_every steps, and interpolated from (0, 0) between)."""
    from .compare import read_run

    if not RunDir(run_dir).metrics.exists():
        return [], []
    curve = read_run(run_dir).curve
    return [t for t, _ in curve], [loss for _, loss in curve]


def plot_loss_vs_tokens(rows: list[dict], sources, out_dir: Path, max_tokens: int | None = None) -> Path | None:
    """Loss against tokens seen, one color per run, in two panels because the budgets differ: left, the
    loss eval.py measured at each checkpoint (its max_tokens); right, the validation loss train.py logged
    (the run's trainer.eval_batches x batch_size x data.seq_len). Models without a token count are left
    out; None if nothing has one."""
    from .compare import _axes, run_identity

    runs: dict[str, list[tuple[int, float]]] = {}
    run_dirs, budgets = {}, set()
    for row, source in zip(rows, sources):
        if source.tokens_seen is None:
            continue
        key = source.run_dir.name if source.run_dir is not None else source.label
        if row.get("residual"):
            key += f" ({row['residual']})"
        runs.setdefault(key, []).append((source.tokens_seen, row["loss"]))
        run_dirs[key] = source.run_dir
        budgets.add(row.get("eval_tokens"))
    if not runs:
        return None
    figure, (measured, logged) = _axes(2)
    train_budgets = set()
    for i, (name, points) in enumerate(sorted(runs.items())):
        color = f"C{i % 10}"
        points.sort()
        measured.plot([t for t, _ in points], [v for _, v in points], "o-", color=color, label=name)
        if run_dirs[name] is not None:
            tokens, losses = training_curve(run_dirs[name])
            if tokens:
                logged.plot(tokens, losses, "x--", color=color, label=name)
                train_budgets.add(run_identity(run_dirs[name])[2])
    said = ", ".join(f"{b:,}" for b in sorted(b for b in budgets if b)) or f"{max_tokens or '?'}"
    measured.set_title(f"eval.py: loss on the first {said} tokens of the split", fontsize=9)
    train_said = ", ".join(f"{b:,}" for b in sorted(b for b in train_budgets if b)) or "unknown"
    logged.set_title(f"train.py: validation loss on its first {train_said} tokens\n"
                     "(another sample of the split: not comparable with the left panel)", fontsize=9)
    for ax in (measured, logged):
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    figure.tight_layout()
    path = out_dir / "loss_vs_tokens.png"
    figure.savefig(path)
    return path
