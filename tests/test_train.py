"""End-to-end runs of train.py: the loss falls, resume is exact, errors stop before any work, export loads."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def last_line(result) -> str:
    return result.stdout.strip().splitlines()[-1]


def test_twenty_steps_lower_the_loss_and_report(train_cli, tmp_path):
    result = train_cli("trainer.max_steps=20", "trainer.eval_every=10", "trainer.run_name=falls", "optim.lr=1e-2")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "falls"
    losses = train_losses(run_dir)
    assert len(losses) == 20 and not any(math.isnan(v) for v in losses.values())
    first, last = losses[1], sum(losses[s] for s in range(16, 21)) / 5
    assert last < first - 0.5, losses
    line = last_line(result)
    assert f"run dir: {run_dir}" in line and "final val loss:" in line and "tokens/s:" in line
    val = float(line.split("final val loss: ")[1].split()[0])
    unigram = float(line.split("(unigram ")[1].split(")")[0])
    assert val < unigram + 0.5  # already near the unigram floor after 20 tiny steps
    assert (run_dir / "checkpoints" / "step_000020").is_dir()
    assert (run_dir / "export" / "model.safetensors").exists()


def test_the_console_shows_our_lines_not_library_noise(train_cli, tmp_path):
    """A fresh cache (the tokenizer is trained) and a fresh matplotlib: stdout holds only our own lines."""
    result = train_cli("trainer.max_steps=2", "trainer.eval_every=2", "trainer.run_name=quiet",
                       f"data.cache_dir={tmp_path / 'fresh-cache'}", env={"MPLCONFIGDIR": str(tmp_path / "mpl")})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) >= 3 and all(line.strip() for line in lines), lines  # no blank lines from the BPE trainer
    library_logs = [line for line in lines if re.match(r"\[[^]]*\]\[(?!__main__|mhc_lm)[^]]*\]\[", line)]
    assert not library_logs
    everything = result.stdout + result.stderr
    for noise in ("Setting accelerator to CPU", "deprecated", "fontManager", "Writing model shards"):
        assert noise not in everything


def test_plain_residual_baseline_runs(train_cli, tmp_path):
    result = train_cli("residual=residual", "trainer.max_steps=3", "trainer.run_name=baseline")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "runs" / "baseline" / "export" / "config.json").read_text())
    assert config["residual"]["name"] == "residual" and config["residual"]["n"] == 1


def test_the_run_logs_the_activation_bytes_its_forward_keeps(tiny_run):
    """memory/token_activation_bytes (compare's activation column) is what mhc_lm.activations measures on a
    fresh model of the run's config, one sequence of the run's length; per token."""
    from mhc_lm.activations import activation_bytes
    from mhc_lm.model import MhcConfig, MhcForCausalLM

    logged = [m["memory/token_activation_bytes"] for m in read_metrics(tiny_run)
              if "memory/token_activation_bytes" in m]
    assert len(logged) == 1
    config = MhcConfig.from_pretrained(tiny_run / "export")
    ids = torch.randint(0, config.vocab_size, (1, 32))  # data.seq_len of TINY_RUN
    expected = activation_bytes(MhcForCausalLM(config).train(), ids) / ids.numel()
    assert logged[0] == pytest.approx(expected, rel=1e-9)
    plain = MhcForCausalLM(MhcConfig.from_pretrained(tiny_run / "export", residual={"name": "residual", "n": 1}))
    assert logged[0] > 1.2 * activation_bytes(plain.train(), ids) / ids.numel()  # four streams cost more


def test_the_activation_bytes_are_measured_in_the_runs_precision(train_cli, tmp_path):
    """Under trainer.precision=bf16 the measurement runs under the same autocast: the bf16 bytes, not fp32's."""
    from mhc_lm.activations import activation_bytes
    from mhc_lm.model import MhcConfig, MhcForCausalLM

    result = train_cli("trainer.max_steps=1", "trainer.precision=bf16", "trainer.run_name=bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "bf16"
    [logged] = [m["memory/token_activation_bytes"] for m in read_metrics(run_dir) if "memory/token_activation_bytes" in m]
    model = MhcForCausalLM(MhcConfig.from_pretrained(run_dir / "export")).train()
    ids = torch.randint(0, model.config.vocab_size, (1, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = activation_bytes(model, ids) / ids.numel()
    assert logged == pytest.approx(expected, rel=1e-9)
    # Not fp32's figure (on this tiny model autocast's bf16 copies of the weights even outweigh the halved
    # activations: they are kept for the backward too).
    assert abs(logged / (activation_bytes(model, ids) / ids.numel()) - 1) > 0.1


@pytest.mark.compat
def test_resume_reproduces_the_uninterrupted_losses(train_cli, tmp_path):
    """Also across activation recompute: the straight run keeps everything, the interrupted one recomputes
    the mHC glue and, resumed, whole blocks; the losses are the same bits."""
    common = ["trainer.max_steps=16", "trainer.ckpt_every=4", "trainer.eval_every=8"]
    straight = train_cli(*common, "trainer.run_name=straight", "trainer.activation_checkpointing=none")
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = train_cli(*common, "trainer.run_name=interrupted", "trainer.stop_at_step=8",
                        "trainer.activation_checkpointing=mhc")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped at trainer.stop_at_step at step 8 of 16" in last_line(stopped)
    run_dir = tmp_path / "runs" / "interrupted"
    assert not (run_dir / "export").exists()
    # A crash in the middle of a later save leaves a partial directory: resume must skip it.
    partial = run_dir / "checkpoints" / ".tmp-step_000012"
    shutil.copytree(run_dir / "checkpoints" / "step_000008", partial)
    (partial / "model.safetensors").write_bytes(b"garbage")
    resumed = train_cli(*common, "trainer.run_name=interrupted", "trainer.activation_checkpointing=full")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout + resumed.stderr
    a, b = train_losses(tmp_path / "runs" / "straight"), train_losses(run_dir)
    assert [b[s] for s in range(9, 17)] == [a[s] for s in range(9, 17)]  # bitwise, on CPU
    val_a = [m["val/loss"] for m in read_metrics(tmp_path / "runs" / "straight") if "val/loss" in m]
    val_b = [m["val/loss"] for m in read_metrics(run_dir) if "val/loss" in m]
    assert val_a == val_b
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(".")) == \
        ["step_000012", "step_000016"]  # keep_last=2


def test_resume_from_an_incompatible_checkpoint_is_refused(train_cli, tmp_path):
    first = train_cli("trainer.max_steps=2", "trainer.run_name=compat")
    assert first.returncode == 0, first.stderr[-3000:]
    again = train_cli("trainer.max_steps=4", "trainer.run_name=compat", "residual.n=2")
    assert again.returncode == 2
    assert "residual.n=2: the checkpoint" in again.stderr and "was trained with residual.n=4" in again.stderr


@pytest.mark.parametrize("override,message", [
    ("residual.n=0", "error: residual.n=0"),
    ("model.n_heads=3", "error: model.n_heads=3: model.d_model=64 must be divisible by it"),
    ("residual.sinkhorn_iters=0", "error: residual.sinkhorn_iters=0"),
    ("data.seq_len=512", "error: data.seq_len=512: longer than the model's context"),
    ("data=local", "error: data.files=[]"),
    ("trainer.activation_checkpointing=blocks", "error: trainer.activation_checkpointing='blocks': allowed: none, mhc, full"),
    ("trainer.recompute_group=0", "error: trainer.recompute_group=0: allowed: a number >= 1"),
])
def test_bad_config_stops_before_any_work(train_cli, tmp_path, override, message):
    extra = ["data.files=[]"] if override == "data=local" else []
    result = train_cli(override, *extra, "trainer.run_name=bad")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "Tokenizing" not in result.stderr
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()


def test_export_loads_with_auto_classes_and_matches_the_checkpoint(train_cli, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mhc_lm.model  # noqa: F401  (registers the architecture with the Auto classes)

    result = train_cli("trainer.max_steps=4", "trainer.run_name=export")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "export"
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "export")
    reference = AutoModelForCausalLM.from_config(model.config).eval()
    state = load_file(run_dir / "checkpoints" / "step_000004" / "model.safetensors")
    reference.load_state_dict(state, strict=False)  # lm_head is tied to the embedding
    reference.tie_weights()
    ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    text = tokenizer.decode(model.generate(ids, max_new_tokens=5, do_sample=False)[0])
    assert text.startswith("To be, or not to be")


def test_gradient_accumulation_normalizes_per_token(train_cli, tmp_path):
    """Two micro-batches of 4 give the same steps as one batch of 8 (same blocks, loss per token)."""
    one = train_cli("trainer.max_steps=3", "trainer.batch_size=8", "trainer.run_name=accum1")
    two = train_cli("trainer.max_steps=3", "trainer.batch_size=4", "trainer.grad_accum=2", "trainer.run_name=accum2")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    a, b = train_losses(tmp_path / "runs" / "accum1"), train_losses(tmp_path / "runs" / "accum2")
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5)


def test_wandb_defaults_to_offline_without_an_api_key(train_cli, tmp_path):
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "", "HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path)}
    result = train_cli("logger=wandb", "trainer.max_steps=2", "trainer.run_name=wb", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "W&B is logging offline; upload later with: wandb sync" in result.stdout
    assert list((tmp_path / "runs" / "wb" / "wandb").glob("offline-run-*"))


def test_a_streamed_dataset_on_two_processes_resumes_with_the_uninterrupted_losses(cache_dir, tmp_path):
    """torchrun, 2 CPU processes (gloo, DDP): each rank streams its shards and saves its own data state."""
    from data_worker import write_corpus

    from conftest import ROOT, TINY_RUN

    write_corpus(tmp_path / "corpus")
    common = [*TINY_RUN, f"trainer.output_dir={tmp_path / 'runs'}", f"data.cache_dir={cache_dir}", "data=hub",
              f"data.path={tmp_path / 'corpus'}", "data.val_docs=4", "data.sample_docs=40", "data.shuffle_buffer=16",
              "trainer.batch_size=2", "trainer.max_steps=8", "trainer.ckpt_every=4", "trainer.eval_every=4",
              "trainer.export=false"]

    def torchrun(*overrides: str):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(ROOT / "train.py"), *common, *overrides]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)

    straight = torchrun("trainer.run_name=stream-straight")
    assert "train streamed from" in straight.stdout and "final val loss" in straight.stdout, straight.stderr[-3000:]
    stopped = torchrun("trainer.run_name=stream-resumed", "trainer.stop_at_step=4")
    assert "stopped at trainer.stop_at_step at step 4 of 8" in stopped.stdout, stopped.stderr[-3000:]
    checkpoint = tmp_path / "runs" / "stream-resumed" / "checkpoints" / "step_000004"
    states = [json.loads((checkpoint / f"data_state_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(s["version"], s["kind"], s["rank"], s["world_size"]) for s in states] == [(1, "stream", r, 2) for r in (0, 1)]
    resumed = torchrun("trainer.run_name=stream-resumed")
    assert "Resumed from" in resumed.stdout + resumed.stderr and "final val loss" in resumed.stdout, \
        resumed.stderr[-3000:]
    a, b = train_losses(tmp_path / "runs" / "stream-straight"), train_losses(tmp_path / "runs" / "stream-resumed")
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]  # bitwise, on CPU
