"""Preemption: every rank names the real cause, the run exits with EXIT_PREEMPTED, and RUN/continue.sh
continues it exactly (same overrides, same launcher)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_RUN
from mhc_lm import distributed
from mhc_lm.distributed import Preemption, continue_command, write_stop_record
from mhc_lm.errors import EXIT_PREEMPTED


class TwoRanks:
    """An accelerator whose reduce adds the flags of another rank that got `other` (None: no signal)."""

    device = torch.device("cpu")

    def __init__(self, other: str | None):
        self.other = other

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor + torch.tensor([float(self.other == name) for name in distributed.PREEMPT_SIGNALS])


def test_a_rank_that_was_not_signalled_names_the_other_ranks_signal(monkeypatch):
    monkeypatch.setattr(distributed.signal, "signal", lambda *a: None)  # leave this process's handlers alone
    quiet = Preemption()
    assert not quiet.requested(TwoRanks(None)) and quiet.cause is None
    assert quiet.requested(TwoRanks("SIGUSR1"))
    assert quiet.received is None and quiet.cause == "SIGUSR1"


def test_the_continue_command_keeps_the_overrides_and_the_launcher(monkeypatch, tmp_path):
    argv = ["/somewhere/train.py", "model=tiny", "trainer.stop_at_step=3", "hydra.run.dir=old", "optim.lr=1e-3"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    expected_tail = ["model=tiny", "optim.lr=1e-3", f"hydra.run.dir={tmp_path}", "trainer.resume=auto"]
    assert continue_command(tmp_path) == [sys.executable, "/somewhere/train.py", *expected_tail]
    # Under an elastic agent the agent's own command line is the launcher (here a stand-in process).
    launcher = [sys.executable, "-c", "import time; time.sleep(60)", "--config_file", "zero2.yaml",
                "--num_processes", "2", "/somewhere/train.py", "model=tiny"]
    agent = subprocess.Popen(launcher)
    try:
        time.sleep(0.2)
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
        monkeypatch.setattr(distributed.os, "getppid", lambda: agent.pid)
        assert continue_command(tmp_path) == [*launcher[:-1], *expected_tail]
        script = write_stop_record(tmp_path, 3, "SIGTERM")
    finally:
        agent.kill()
        agent.wait()
    assert script.read_text().splitlines()[-1].endswith("--num_processes 2 /somewhere/train.py model=tiny "
                                                        f"optim.lr=1e-3 hydra.run.dir={tmp_path} trainer.resume=auto")
    assert json.loads((tmp_path / "stopped.json").read_text())["cause"] == "SIGTERM"


@pytest.mark.parametrize("slurm", [False, True])
def test_the_continue_script_says_where_to_run_it_on_several_nodes(monkeypatch, tmp_path, slurm):
    monkeypatch.setattr(sys, "argv", ["/somewhere/train.py", "model=tiny"])
    for name in ("TORCHELASTIC_RUN_ID", "MHC_LM_SUPERVISE", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert "node" not in write_stop_record(tmp_path, 3, "SIGTERM").read_text()  # one node: nothing to add
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    if slurm:
        monkeypatch.setenv("SLURM_JOB_ID", "123")
    lines = write_stop_record(tmp_path, 3, "SIGTERM").read_text().splitlines()
    expected = "# 4 nodes under SLURM: resubmit the sbatch script" if slurm else "# 4 nodes: run this script on every node"
    assert lines[2].startswith(expected) and lines[-1].startswith("exec ")


def test_a_supervised_run_continues_under_the_supervisor(monkeypatch, tmp_path):
    """launch/supervise.sh exports its path; continue.sh puts it (with the run directory) before the launcher."""
    launcher = [sys.executable, "-c", "import time; time.sleep(60)", "--nproc_per_node", "2", "/somewhere/train.py"]
    monkeypatch.setattr(sys, "argv", ["/somewhere/train.py", "model=tiny"])
    monkeypatch.setenv("MHC_LM_SUPERVISE", "/repo/launch/supervise.sh")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    # Without an elastic agent (python train.py under the supervisor): the interpreter's command, no prefix.
    assert continue_command(tmp_path)[:2] == [sys.executable, "/somewhere/train.py"]
    agent = subprocess.Popen(launcher)
    try:
        time.sleep(0.2)
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
        monkeypatch.setattr(distributed.os, "getppid", lambda: agent.pid)
        assert continue_command(tmp_path) == ["/repo/launch/supervise.sh", str(tmp_path), *launcher,
                                              "model=tiny", f"hydra.run.dir={tmp_path}", "trainer.resume=auto"]
    finally:
        agent.kill()
        agent.wait()


@pytest.mark.slow
def test_a_preempted_run_exits_75_and_its_continue_script_finishes_it_exactly(tiny_run, cache_dir, tmp_path):
    """The tiny_run settings, preempted with SIGUSR1 after two steps, then continued with RUN/continue.sh:
    the losses after the resume are tiny_run's, bit for bit."""
    run_dir = tmp_path / "preempted"
    args = [*TINY_RUN, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", "trainer.max_steps=8",
            "trainer.ckpt_every=4", "trainer.eval_every=4", "trainer.num_threads=1"]
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be signalled"
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == EXIT_PREEMPTED, output[-3000:]
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert stopped["cause"] == "SIGUSR1" and f"stopped on SIGUSR1 at step {stopped['step']} of 8" in output
    assert f"continue with: bash {run_dir / 'continue.sh'}" in output
    resumed = subprocess.run(["bash", str(run_dir / "continue.sh")], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run_dir / "stopped.json").exists()

    def losses(path: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

    reference, found = losses(tiny_run), losses(run_dir)
    assert [found[s] for s in range(stopped["step"] + 1, 9)] == [reference[s] for s in range(stopped["step"] + 1, 9)]


@pytest.mark.slow
def test_torchrun_script_preempted_on_two_ranks_exits_75_without_a_traceback(cache_dir, tmp_path):
    """USR1 to launch/torchrun.sh: both ranks checkpoint, the script exits 75 with one line, no elastic
    traceback; RUN/continue.sh (torchrun with the run's overrides) finishes the run."""
    run_dir = tmp_path / "torchrun"
    args = [*TINY_RUN, f"data.cache_dir={cache_dir}", "trainer.max_steps=40", "trainer.ckpt_every=0",
            "trainer.eval_every=40", "trainer.export=false"]
    env = {**os.environ, "NPROC_PER_NODE": "2", "RUN_DIR": str(run_dir), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(["bash", "launch/torchrun.sh", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    out, err = process.communicate(timeout=300)
    assert process.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert "[rank 0] received SIGUSR1" in err and "[rank 1] received SIGUSR1" in err
    assert err.strip().splitlines()[-1].startswith("preempted: every rank checkpointed")
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert stopped["cause"] == "SIGUSR1" and f"stopped on SIGUSR1 at step {stopped['step']} of 40" in out
    command = (run_dir / "continue.sh").read_text().splitlines()[-1]
    assert f"{ROOT / 'launch' / 'supervise.sh'} {run_dir} " in command  # a second preemption exits 75 too
    assert "--nproc_per_node 2" in command and f"hydra.run.dir={run_dir}" in command and "trainer.max_steps=40" in command
    resumed = subprocess.run(["bash", str(run_dir / "continue.sh")], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from {run_dir / 'checkpoints' / 'step_'}" in resumed.stdout + resumed.stderr


FAKE_AGENT = r"""#!/bin/bash
# A stand-in elastic agent: one rank that, on USR1, records the stop as train.py does and exits 0.
bash -c 'trap "printf \"{\\\"cause\\\": \\\"SIGUSR1\\\"}\" > $0/stopped.json; exit 0" USR1
         touch $0/ready; while true; do sleep 0.05; done' "$1" &
wait "$!"  # the rank's status is the agent's
"""


@pytest.mark.parametrize("send", [signal.SIGUSR1, None])
def test_supervise_forwards_signals_to_the_ranks_and_exits_75_when_preempted(tmp_path, send):
    agent = tmp_path / "agent"
    agent.write_text(FAKE_AGENT)
    agent.chmod(0o755)
    process = subprocess.Popen(["bash", str(ROOT / "launch" / "supervise.sh"), str(tmp_path), str(agent), str(tmp_path)],
                               stderr=subprocess.PIPE, text=True)
    try:
        supervise_and_signal(process, tmp_path, send)
    finally:  # the agent runs in its own session: a failed check must not leave it looping
        process.kill()
        subprocess.run(["pkill", "-KILL", "-f", str(tmp_path)], check=False)


def supervise_and_signal(process: subprocess.Popen, tmp_path: Path, send) -> None:
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists():  # the rank's trap is set
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.02)
    if send is None:  # a signal that stops no run: the launcher's own status, no preemption claimed
        process.send_signal(signal.SIGHUP)  # forwarded to the rank, which dies of it (128 + 1)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 129 and "preempted" not in err and not (tmp_path / "stopped.json").exists()
        return
    process.send_signal(send)
    _, err = process.communicate(timeout=30)
    assert process.returncode == EXIT_PREEMPTED, err
    assert err.strip().splitlines() == [f"preempted: every rank checkpointed; continue with: bash {tmp_path}/continue.sh "
                                        "(exit 75)"]
