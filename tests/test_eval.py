"""eval.py: loss, perplexity and bits per byte against an independent computation from the exported
model's logits; the local lm-eval task; generation with the KV cache; the table and the plot; errors."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, run_cli
from mhc_lm.console import LM_EVAL_EXPECTED
from mhc_lm.errors import ConfigError

TASKS = ROOT / "tests" / "lm_eval_tasks"
SEQ_LEN, MAX_TOKENS = 32, 640  # 20 blocks: not a multiple of the batch size
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def gpt2_byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (printable stand-ins for the 256 bytes) back to bytes, built here
    so that the byte count does not go through tokenizer.decode."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def independent_metrics(export: Path, cache_dir: Path) -> dict[str, float]:
    """Loss, perplexity, bits per byte of the exported model on the first MAX_TOKENS validation targets,
    from its logits in float64 (no mhc_lm.metrics, no eval_batches, no tokenizer.decode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mhc_lm.model  # noqa: F401
    from mhc_lm.config import DataConfig
    from mhc_lm.data import prepare_data

    model = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    data = prepare_data(DataConfig(seq_len=SEQ_LEN, tokenizer=str(export), cache_dir=str(cache_dir)))
    blocks = MAX_TOKENS // SEQ_LEN
    stream = torch.from_numpy(np.asarray(data.validation[: blocks * SEQ_LEN + 1], dtype=np.int64))
    nll = 0.0
    with torch.no_grad():
        for b in range(blocks):
            chunk = stream[b * SEQ_LEN: (b + 1) * SEQ_LEN + 1]
            logits = model(chunk[None, :-1]).logits[0].double()
            nll -= F.log_softmax(logits, -1).gather(-1, chunk[1:, None]).sum().item()
    decoder = gpt2_byte_decoder()
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens([t for t in stream[1:].tolist() if t not in special])
    n_bytes = sum(len(piece) for piece in pieces)
    assert all(c in decoder for piece in pieces for c in piece)  # every piece is bytes in the GPT-2 alphabet
    loss = nll / (blocks * SEQ_LEN)
    return {"loss": loss, "ppl": math.exp(loss), "bits_per_byte": nll / math.log(2) / n_bytes, "eval_bytes": n_bytes}


def independent_accuracy(export: Path) -> float:
    """Accuracy on tiny_sequences: the choice with the highest summed log-probability after the query."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mhc_lm.model  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    docs = [json.loads(line) for line in (TASKS / "tiny_sequences.jsonl").read_text().splitlines()]
    correct = 0
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            context = tokenizer(doc["query"], add_special_tokens=False).input_ids
            whole = tokenizer(doc["query"] + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        correct += int(np.argmax(scores) == doc["gold"])
    return correct / len(docs)


@pytest.fixture(scope="module")
def eval_run(tiny_run, cache_dir, tmp_path_factory):
    """eval.py on every checkpoint of the tiny run and on its export, with the local lm-eval task."""
    out = tmp_path_factory.mktemp("evals")
    tasks = ["lm_eval.tasks=[tiny_sequences]", f"lm_eval.include_path={TASKS}"] if HAS_LM_EVAL else []
    result = run_cli("eval.py", f"models=[{tiny_run},{tiny_run / 'export'}]", "checkpoints=all",
                     f"data.seq_len={SEQ_LEN}", f"data.cache_dir={cache_dir}", f"max_tokens={MAX_TOKENS}",
                     "batch_size=8", *tasks, "generate.max_new_tokens=8", "num_threads=1", f"output_dir={out}",
                     "run_name=cmp")
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "cmp", result


def test_eval_perplexity_and_bits_per_byte_match_the_exported_logits(eval_run, tiny_run, cache_dir):
    out, _ = eval_run
    rows = {r["model"]: r for r in csv.DictReader(open(out / "results.csv"))}
    export = rows["tiny/export"]
    expected = independent_metrics(tiny_run / "export", cache_dir)
    assert int(export["eval_tokens"]) == MAX_TOKENS and int(export["eval_bytes"]) == expected["eval_bytes"]
    for key in ("loss", "ppl", "bits_per_byte"):
        assert float(export[key]) == pytest.approx(expected[key], rel=1e-5), key
    # The export is the final checkpoint: the same model measured twice.
    assert float(rows["tiny/step_000008"]["loss"]) == pytest.approx(float(export["loss"]), rel=1e-6)


@pytest.mark.skipif(not HAS_LM_EVAL, reason="needs the eval extra (lm_eval)")
def test_the_local_lm_eval_task_runs_and_scores_like_an_independent_count(eval_run, tiny_run):
    out, result = eval_run
    rows = {r["model"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert float(rows["tiny/export"]["tiny_sequences/acc"]) == independent_accuracy(tiny_run / "export")
    assert "Running loglikelihood requests" in result.stderr


def test_one_table_one_plot_and_samples_for_all_models(eval_run):
    out, result = eval_run
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["model"] for r in rows] == ["tiny/step_000004", "tiny/step_000008", "tiny/export"]
    assert [r["tokens_seen"] for r in rows] == ["512", "1024", "1024"]  # 4 sequences x 32 tokens per step
    assert float(rows[1]["loss"]) < float(rows[0]["loss"])
    markdown = (out / "results.md").read_text().splitlines()
    assert markdown[0].startswith("| model | run | residual | kind | step | tokens_seen |")
    assert len(markdown) == 2 + len(rows)
    assert "| tiny/step_000004 | tiny | mhc | checkpoint | 4 | 512 |" in markdown[2]
    assert (out / "loss_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * len(rows) and all(0 < s["new_tokens"] <= 8 and s["tokens_per_s"] > 0 for s in samples)
    assert all(float(r["gen_tokens_per_s"]) > 0 for r in rows)
    assert "results: " in result.stdout and "| tiny/export | tiny | mhc | export | 8 | 1,024 |" in result.stdout


def test_the_console_shows_results_not_library_noise(eval_run):
    _, result = eval_run
    everything = result.stdout + result.stderr
    for noise in (*LM_EVAL_EXPECTED, "Setting accelerator to CPU", "deprecated", "fontManager"):
        assert noise not in everything
    assert not [line for line in everything.splitlines() if re.search(r"\bINFO\b.*\blm_eval\b|\[lm_eval", line)]


def test_training_curve_tokens_come_from_the_logged_tokens(tiny_run):
    from mhc_lm.evaluation import training_curve

    tokens, losses = training_curve(tiny_run)
    logged = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert tokens == [512.0, 1024.0]  # validation at steps 4 and 8, 128 tokens per step
    assert losses == [m["val/loss"] for m in logged if "val/loss" in m]


def test_greedy_generation_with_the_kv_cache_matches_decoding_without_it(tiny_run):
    from accelerate import Accelerator

    from mhc_lm.evaluation import sample_generations
    from mhc_lm.model import CACHE_KEY
    from mhc_lm.model_sources import load_source, resolve_sources

    model, tokenizer = load_source(resolve_sources(str(tiny_run))[0])
    calls = []
    forward = model.forward

    def recording_forward(*args, **kwargs):
        calls.append((kwargs["input_ids"].shape[1], kwargs.get(CACHE_KEY) is not None))
        return forward(*args, **kwargs)

    model.forward = recording_forward
    samples, tokens_per_s = sample_generations(model, tokenizer, ["ROMEO:"], 6, 0.0, None, 0, Accelerator(cpu=True))
    model.forward = forward
    prompt = tokenizer("ROMEO:", add_special_tokens=False).input_ids
    assert calls[0][0] == len(prompt) and all(length == 1 and cached for length, cached in calls[1:])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(6):  # no cache: the whole sequence every step
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert samples[0]["completion"] == tokenizer.decode(ids[0, len(prompt):])
    assert samples[0]["new_tokens"] == 6 and tokens_per_s > 0


def test_a_checkpoint_without_tokenizer_files_takes_the_runs_tokenizer(tiny_run, tmp_path):
    from mhc_lm.checkpoint import load_model_from_checkpoint

    run = tmp_path / "run"
    shutil.copytree(tiny_run / ".hydra", run / ".hydra")
    bare = run / "checkpoints" / "step_000004"
    shutil.copytree(tiny_run / "checkpoints" / "step_000004", bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    new_model, new_tok = load_model_from_checkpoint(tiny_run / "checkpoints" / "step_000004")
    bare_model, bare_tok = load_model_from_checkpoint(bare)
    ids = torch.tensor([new_tok("To be, or not to be").input_ids])
    assert bare_tok("To be, or not to be").input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(bare_model(ids).logits, new_model(ids).logits)


def test_a_checkpoint_without_config_json_is_refused_in_one_line(tiny_run, tmp_path):
    from mhc_lm.checkpoint import load_model_from_checkpoint
    from mhc_lm.errors import ConfigError

    bare = tmp_path / "step_000004"
    shutil.copytree(tiny_run / "checkpoints" / "step_000004", bare)
    (bare / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"step_000004: no config.json.*allowed: a checkpoint written by mhc-lm") as err:
        load_model_from_checkpoint(bare)
    assert "\n" not in str(err.value)


def composed_eval(*overrides: str):
    from mhc_lm.config import EvalConfig, compose_config

    cfg = compose_config(["run_name=test", *overrides], config_name="eval")
    assert isinstance(cfg, EvalConfig)
    return cfg


@pytest.mark.parametrize("overrides,message", [
    (["models=[]"], "models=[]: allowed: one or more checkpoints"),
    (["models=[/nonexistent/run]"], "models='/nonexistent/run': no such directory, and not a Hub id"),
    (["checkpoints=first"], "checkpoints='first': allowed: last, all"),
    (["split=test"], "split='test': allowed: validation, train"),
    (["max_tokens=10"], "max_tokens=10: allowed: a number >= 128"),
    (["generate.temperature=-1"], "generate.temperature=-1"),
    (["lm_eval.include_path=/nonexistent"], "lm_eval.include_path='/nonexistent': no such directory"),
    (["data.seq_len=512"], "data.seq_len=512: longer than the context of tiny/export (256)"),
    (["data=hub", "data.path=org/name", "split=train"], "split='train': data=hub streams its training split"),
    pytest.param([f"lm_eval.include_path={TASKS}", "lm_eval.tasks=[no_such_task_anywhere]"],
                 "lm_eval.tasks=['no_such_task_anywhere']: unknown task(s) no_such_task_anywhere",
                 marks=pytest.mark.skipif(not HAS_LM_EVAL, reason="needs the eval extra (lm_eval)")),
])
def test_bad_eval_options_stop_before_any_model_loads(tiny_run, tmp_path, monkeypatch, overrides, message):
    evaluate = eval_script_with_no_model_loading(monkeypatch)
    with pytest.raises(ConfigError, match=re.escape(message)):
        evaluate(composed_eval(f"models=[{tiny_run}]", *overrides), tmp_path / "out")


def test_lm_eval_tasks_without_lm_eval_installed_are_an_error(tiny_run, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else
                        real_find_spec(name, *a))
    evaluate = eval_script_with_no_model_loading(monkeypatch)
    with pytest.raises(ConfigError, match=re.escape("lm_eval.tasks=['hellaswag']: lm-evaluation-harness is not "
                                                    "installed; allowed: pip install -e \".[eval]\"")):
        evaluate(composed_eval(f"models=[{tiny_run}]", "lm_eval.tasks=[hellaswag]"), tmp_path / "out")


def eval_script_with_no_model_loading(monkeypatch):
    """eval.py's evaluate(), with model loading turned into a failure."""
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("mhc_lm.model_sources.load_source", no_loading)
    spec = importlib.util.spec_from_file_location("eval_script", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.evaluate


def test_eval_cli_reports_a_bad_option_with_exit_code_2(tmp_path):
    result = run_cli("eval.py", "models=[/nonexistent/run]", f"output_dir={tmp_path}")
    assert result.returncode == 2
    assert "error: models='/nonexistent/run': no such directory" in result.stderr and "Traceback" not in result.stderr
