"""`python -m mhc_lm.memory`: its activation figure against the measured bytes, the engines' sharding, its
command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mhc_lm.activations import activation_bytes
from mhc_lm.memory import activation_elements_per_token, footprints, parse_memory
from mhc_lm.model import MhcConfig, MhcForCausalLM

from conftest import ROOT


@pytest.mark.parametrize("policy", ["none", "mhc", "full"])
@pytest.mark.parametrize("name,n", [("residual", 1), ("mhc", 4), ("mhc", 2)])
def test_the_activation_figure_is_within_ten_percent_of_the_measured_bytes(name, n, policy):
    """A shape the model was not fitted on (width 96, 3 heads, 5 layers, groups of 2 blocks), fp32 on CPU."""
    config = MhcConfig(vocab_size=512, hidden_size=96, num_hidden_layers=5, num_attention_heads=3,
                       max_position_embeddings=64, residual={"name": name, "n": n},
                       activation_checkpointing=policy, recompute_group=4)
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 64))
    measured = activation_bytes(MhcForCausalLM(config), ids)
    estimated = 4 * activation_elements_per_token(config) * ids.numel()
    assert estimated == pytest.approx(measured, rel=0.10)


def test_engines_shard_what_they_should():
    rows = {r.engine: r for r in footprints(1000, 7.0, gpus=4)}
    assert (rows["ddp"].parameters, rows["ddp"].gradients, rows["ddp"].optimizer) == (4000, 4000, 8000)
    assert (rows["zero1"].parameters, rows["zero1"].gradients, rows["zero1"].optimizer) == (4000, 4000, 2000)
    assert (rows["zero2"].parameters, rows["zero2"].gradients, rows["zero2"].optimizer) == (4000, 1000, 2000)
    assert (rows["zero3"].parameters, rows["zero3"].gradients, rows["zero3"].optimizer) == (1000, 1000, 2000)
    assert rows["fsdp"].total == rows["zero3"].total == 4007.0


def test_memory_sizes_parse():
    assert parse_memory("80GB") == 80e9 and parse_memory("80GiB") == 80 * 2**30 and parse_memory("512MB") == 512e6


def memory_cli(*args):
    return subprocess.run([sys.executable, "-m", "mhc_lm.memory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_the_command_prints_every_engine_and_whether_it_fits():
    done = memory_cli("model=base", "residual=mhc", "trainer.batch_size=16", "data.seq_len=1024",
                      "trainer.activation_checkpointing=full", "--gpus", "8", "--gpu-memory", "1GB")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[2:]}
    assert set(rows) == {"ddp", "zero1", "zero2", "zero3", "fsdp"}
    assert rows["ddp"][-1] == "no" and float(rows["zero3"][1]) < float(rows["ddp"][1])


@pytest.mark.parametrize("args,message", [
    (["--gpu-memory", "lots"], "--gpu-memory='lots': allowed: a size"),
    (["--gpus", "0"], "--gpus=0: allowed: a number >= 1"),
    (["trainer.activation_checkpointing=some"], "trainer.activation_checkpointing='some': allowed: none, mhc, full"),
    (["trainer.recompute_group=0"], "trainer.recompute_group=0: allowed: a number >= 1"),
    (["model=huge"], "model=huge"),
])
def test_bad_arguments_are_one_line_exit_2(args, message):
    done = memory_cli(*args)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, \
        done.stderr
