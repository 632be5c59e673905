"""Engines on CPU over gloo with two processes: DDP and DeepSpeed ZeRO 1/2/3 against one process,
ZeRO-2 resume, SIGUSR1 preemption, bad setups, and the launch scripts.

Two-process gloo runs occasionally abort at exit after finishing, so runs are judged by what the
ranks wrote (metrics, checkpoints, the final line), not only by the exit code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_RUN

pytestmark = pytest.mark.slow
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
deepspeed_installed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs the deepspeed extra")

STEPS = 16
# The same global batch everywhere: 8 sequences per step, as 1 x 8 or 2 x 4.
COMMON = [o for o in TINY_RUN if not o.startswith("trainer.batch_size")] + [
    f"trainer.max_steps={STEPS}", "trainer.eval_every=8", "trainer.ckpt_every=4", "optim.lr=1e-2",
    "trainer.export=false",
]
# Engines reach the same losses as one process up to the order of floating-point reductions.
ENGINE_RTOL = 1e-4
LAUNCH_ENV = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "OMP_NUM_THREADS": "1"}


def launch_command(engine: str | None, nproc: int) -> list[str]:
    if engine is None:
        return [sys.executable, str(ROOT / "train.py")]
    config = ROOT / "launch" / "accelerate" / f"{engine}.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(nproc), str(ROOT / "train.py")]


def start(engine: str | None, run_dir: Path, cache_dir: Path, *overrides: str, nproc: int = 2,
          batch_size: int = 4) -> subprocess.Popen:
    args = [*COMMON, f"trainer.batch_size={batch_size}", f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}",
            *overrides]
    return subprocess.Popen([*launch_command(engine, nproc), *args], cwd=ROOT, env={**os.environ, **LAUNCH_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(engine: str | None, run_dir: Path, cache_dir: Path, *overrides: str, **kw) -> str:
    process = start(engine, run_dir, cache_dir, *overrides, **kw)
    output, _ = process.communicate(timeout=900)
    return output


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metric_rows(run_dir) if "train/loss" in r}


def group_grad_norms(run_dir: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("grad_norm/")}
            for r in metric_rows(run_dir) if "grad_norm/global" in r}


def assert_completed(run_dir: Path, output: str, steps: int = STEPS) -> dict[int, float]:
    assert (run_dir / "checkpoints" / f"step_{steps:06d}").is_dir(), output[-4000:]
    found = losses(run_dir)
    assert sorted(found) == list(range(1, steps + 1)), output[-4000:]  # rank 0 alone logs: one line per step
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """Run every engine once (and one process as the reference); tests read what they wrote."""
    root = tmp_path_factory.mktemp("engines")
    engines = ["ddp"] + (["zero1", "zero2", "zero3"] if HAS_DEEPSPEED else [])
    results = {"single": run(None, root / "single", cache_dir, batch_size=8)}
    for engine in engines:
        results[engine] = run(engine, root / engine, cache_dir)
    return root, results


def test_single_process_reference(runs):
    root, outputs = runs
    assert_completed(root / "single", outputs["single"])


@pytest.mark.parametrize("engine", ["ddp", pytest.param("zero1", marks=deepspeed_installed),
                                    pytest.param("zero2", marks=deepspeed_installed),
                                    pytest.param("zero3", marks=deepspeed_installed)])
def test_engine_matches_one_process_with_the_same_global_batch(runs, engine):
    root, outputs = runs
    reference = assert_completed(root / "single", outputs["single"])
    found = assert_completed(root / engine, outputs[engine])
    for step in range(1, STEPS + 1):
        assert found[step] == pytest.approx(reference[step], rel=ENGINE_RTOL), (engine, step)
    # Gradient norms by group are taken before clipping from whole (DDP) or sharded (ZeRO) gradients.
    norms, reference_norms = group_grad_norms(root / engine), group_grad_norms(root / "single")
    assert sorted(norms) == list(range(1, STEPS + 1))
    assert {"grad_norm/attention", "grad_norm/connection.fn", "grad_norm/block.0"} <= set(norms[1])
    for step in (1, STEPS):
        assert norms[step] == pytest.approx(reference_norms[step], rel=1e-3), (engine, step)
    name = "ddp x 2" if engine == "ddp" else f"deepspeed-{engine} x 2"
    assert name in outputs[engine]
    assert (root / engine / ".hydra" / "config.yaml").exists()  # written once, by rank 0
    assert sorted(p.name for p in (root / engine / "checkpoints" / f"step_{STEPS:06d}").glob("data_state_rank*")) == \
        ["data_state_rank0.json", "data_state_rank1.json"]


@deepspeed_installed
def test_zero2_checkpoint_resumes_to_the_same_losses(runs, cache_dir):
    root, outputs = runs
    reference = assert_completed(root / "zero2", outputs["zero2"])
    run_dir = root / "zero2-resumed"
    first = run("zero2", run_dir, cache_dir, "trainer.stop_at_step=8")
    assert "stopped at trainer.stop_at_step at step 8" in first, first[-3000:]
    second = run("zero2", run_dir, cache_dir)
    found = assert_completed(run_dir, second)
    assert "Resumed from" in second
    for step in range(9, STEPS + 1):
        assert found[step] == pytest.approx(reference[step], rel=1e-6), step


def test_sigusr1_checkpoints_every_rank_and_the_resumed_run_continues(runs, cache_dir):
    root, outputs = runs
    reference = assert_completed(root / "ddp", outputs["ddp"])
    run_dir = root / "ddp-preempted"
    process = start("ddp", run_dir, cache_dir)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be signalled"
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)  # to the launcher, which forwards it to both ranks
    output, _ = process.communicate(timeout=600)
    assert "[rank 0] received SIGUSR1" in output and "[rank 1] received SIGUSR1" in output, output[-4000:]
    stopped = [int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")]
    stop_step = max(stopped)
    assert 2 <= stop_step < STEPS, output[-4000:]
    assert f"stopped on SIGUSR1 at step {stop_step} of {STEPS}" in output
    resumed = run("ddp", run_dir, cache_dir)
    found = assert_completed(run_dir, resumed)
    for step in range(stop_step + 1, STEPS + 1):
        assert found[step] == pytest.approx(reference[step], rel=1e-6), step


@deepspeed_installed
def test_connection_parameters_stay_fp32_under_bf16(tmp_path, cache_dir):
    """ZeRO-2 with trainer.precision=bf16 runs DeepSpeed's torch_autocast: weights stay fp32."""
    from safetensors import safe_open

    run_dir = tmp_path / "bf16"
    output = run("zero2", run_dir, cache_dir, "trainer.precision=bf16", "trainer.max_steps=2", "trainer.export=true",
                 nproc=1, batch_size=8)
    assert "| bf16 |" in output and "deepspeed-zero2" in output, output[-4000:]
    with safe_open(run_dir / "export" / "model.safetensors", "pt") as f:
        dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    connection = [k for k in dtypes if k.endswith(("_hc.fn", "_hc.base", "_hc.scale", "hc_fn", "hc_base", "hc_scale"))]
    assert connection and all(dtypes[k] == "F32" for k in connection), dtypes
    # The ZeRO checkpoint loads as a model (eval.py, the Hub) with the export's weights.
    from mhc_lm.checkpoint import load_model_from_checkpoint
    from mhc_lm.model_sources import export_source, load_source

    from_checkpoint, _ = load_model_from_checkpoint(run_dir / "checkpoints" / "step_000002")
    exported, _ = load_source(export_source(run_dir / "export"))
    ids = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        assert torch.equal(from_checkpoint(ids).logits, exported(ids).logits)


def write_ds_config(tmp_path: Path, **overrides) -> Path:
    ds = json.loads((ROOT / "launch" / "deepspeed" / "zero2.json").read_text())
    ds.update(overrides)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    accelerate_cfg = (ROOT / "launch" / "accelerate" / "zero2.yaml").read_text()
    path = tmp_path / "zero2_custom.yaml"
    path.write_text(accelerate_cfg.replace("launch/deepspeed/zero2.json", str(tmp_path / "ds.json")))
    return path


@deepspeed_installed
@pytest.mark.parametrize("overrides,message", [
    ({"train_micro_batch_size_per_gpu": 2}, "trainer.batch_size=8: the DeepSpeed config sets "
                                            "train_micro_batch_size_per_gpu=2"),
    ({"gradient_accumulation_steps": 4}, "trainer.grad_accum=1: the DeepSpeed config sets gradient_accumulation_steps=4"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}, "deepspeed config key 'optimizer'"),
    ({"bf16": {"enabled": True}}, "deepspeed config bf16.enabled=true"),
])
def test_a_deepspeed_config_that_contradicts_the_hydra_config_is_refused(tmp_path, cache_dir, overrides, message):
    config = write_ds_config(tmp_path, **overrides)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", "1", str(ROOT / "train.py"), *COMMON, "trainer.batch_size=8",
               f"data.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert f"error: {message}" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_global_batch_that_does_not_divide_is_refused(train_cli):
    result = train_cli("trainer.global_batch_size=10", "trainer.batch_size=4", "trainer.run_name=nodivide")
    assert result.returncode == 2
    assert ("error: trainer.global_batch_size=10: not divisible by trainer.batch_size=4 x 1 process(es) = 4; "
            "allowed: a multiple of 4") in result.stderr


def test_global_batch_derives_the_accumulation(train_cli, tmp_path):
    result = train_cli("trainer.global_batch_size=8", "trainer.batch_size=4", "trainer.max_steps=2",
                       "trainer.run_name=derived")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "256 tokens/step" in result.stdout  # 8 sequences of 32 tokens: grad_accum = 2


def test_a_missing_rendezvous_variable_is_named(train_cli):
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "", "MASTER_PORT": "29512"}
    result = train_cli("trainer.run_name=norendezvous", env=env)
    assert result.returncode == 2
    assert "error: environment MASTER_ADDR=<unset>: WORLD_SIZE=2 asks for a distributed run" in result.stderr


def test_deepspeed_launcher_local_rank_flag_is_accepted(monkeypatch):
    from mhc_lm.distributed import strip_local_rank_flag

    # The function sets LOCAL_RANK: setenv records it as absent so the undo removes it again.
    monkeypatch.setenv("LOCAL_RANK", "")
    monkeypatch.delenv("LOCAL_RANK")
    argv = ["train.py", "--local_rank=3", "model=tiny", "--local_rank", "5", "x=1"]
    assert strip_local_rank_flag(argv) == ["train.py", "model=tiny", "x=1"]
    assert os.environ["LOCAL_RANK"] == "3"


# ---------------------------------------------------------------------------------------------
# Launch scripts: syntax, and the command lines they generate with stand-ins for srun and friends.

FAKE_SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a17\\ngpu-a18\\n'; else echo "scontrol $*" >> "$FAKE_LOG"; fi
"""
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
if [ -n "${FAKE_SRUN_TRAINING:-}" ]; then
    trap 'echo "ranks checkpointed on USR1" >> "$FAKE_LOG"; exit 0' USR1
    echo "training" >> "$FAKE_LOG"
    for _ in $(seq 1 600); do sleep 0.1; done
    exit 1
fi
for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node "$@"; done
"""
FAKE_LAUNCHER = """#!/bin/bash
{ echo "CALL $(basename "$0")"; printf '%s\\n' "$@"; } >> "$FAKE_LOG"
"""


@pytest.fixture
def fake_cluster(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"scontrol": FAKE_SCONTROL, "srun": FAKE_SRUN, "accelerate": FAKE_LAUNCHER,
                       "torchrun": FAKE_LAUNCHER}.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    workdir = tmp_path / "work"
    shutil.copytree(ROOT / "launch", workdir / "launch")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "calls.log"),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "mhc", "SLURM_JOB_NODELIST": "gpu-a[17-18]",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"}
    return workdir, env, tmp_path / "calls.log"


LAUNCH_SCRIPTS = ["launch/slurm/train.sbatch", "launch/torchrun.sh"]
HELPER_SCRIPTS = ["launch/supervise.sh"]  # run by the launch scripts; tested in test_preemption.py


def test_every_launch_script_is_run_here():
    found = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "launch").rglob("*") if p.suffix in (".sh", ".sbatch"))
    assert found == sorted(LAUNCH_SCRIPTS + HELPER_SCRIPTS), "a new launch script needs a run with the stand-in launchers below"


@pytest.mark.parametrize("script", LAUNCH_SCRIPTS)
def test_launch_scripts_hand_the_overrides_to_train_py(script, fake_cluster):
    """Run for real, with srun/accelerate/torchrun stand-ins on PATH that record their argv: every launcher
    call ends in train.py, the shared run directory, then the user's overrides exactly as given."""
    workdir, env, log = fake_cluster
    result = subprocess.run(["bash", script, "model=tiny", "data.files=[a b/*.txt]"], cwd=workdir, capture_output=True,
                            env={**env, "NPROC_PER_NODE": "2", "RUN_DIR": "runs/shared", "MHC_RUN_DIR": "runs/shared"},
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    launched = calls(log)
    assert launched and all(argv[0] in ("accelerate", "torchrun") for argv in launched)
    for argv in launched:
        tail = argv[argv.index("train.py") + 1:]
        assert tail[0] == "hydra.run.dir=runs/shared", tail
        assert tail[-2:] == ["model=tiny", "data.files=[a b/*.txt]"], tail


def calls(log: Path) -> list[list[str]]:
    chunks = log.read_text().split("CALL ")[1:]
    return [chunk.strip().splitlines() for chunk in chunks]


def test_sbatch_runs_one_accelerate_launch_per_node_with_a_c10d_rendezvous(fake_cluster):
    workdir, env, log = fake_cluster
    result = subprocess.run(["bash", "launch/slurm/train.sbatch", "model=base", "data.files=[my corpus/*.txt]"],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    nodes = calls(log)
    assert len(nodes) == 2
    for rank, argv in enumerate(nodes):
        assert argv[0] == "accelerate" and argv[1] == "launch"
        options = dict(zip(argv[2::2], argv[3::2]))
        assert options["--config_file"] == "launch/accelerate/ddp.yaml"
        assert options["--num_machines"] == "2" and options["--num_processes"] == "16"
        assert options["--machine_rank"] == str(rank)
        assert options["--main_process_ip"] == "gpu-a17" and options["--main_process_port"] == "29500"
        assert options["--rdzv_backend"] == "c10d"
        script_at = argv.index("train.py")
        assert argv[script_at + 1:] == ["hydra.run.dir=runs/mhc-4242", "trainer.resume=auto", "model=base",
                                        "data.files=[my corpus/*.txt]"]
    sbatch = (ROOT / "launch" / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --requeue" in sbatch and "#SBATCH --signal=B:USR1@" in sbatch


def test_sbatch_checkpoints_then_requeues_on_usr1(fake_cluster):
    workdir, env, log = fake_cluster
    process = subprocess.Popen(["bash", "launch/slurm/train.sbatch"], cwd=workdir,
                               env={**env, "FAKE_SRUN_TRAINING": "1"}, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (log.exists() and "training" in log.read_text()):
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    process.communicate(timeout=30)
    assert process.returncode == 0
    assert log.read_text().splitlines() == ["training", "ranks checkpointed on USR1", "scontrol requeue 4242"]


def test_sbatch_refuses_to_run_outside_slurm(fake_cluster):
    workdir, env, _ = fake_cluster
    env.pop("SLURM_JOB_NODELIST")
    result = subprocess.run(["bash", "launch/slurm/train.sbatch"], cwd=workdir, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "error: environment SLURM_JOB_NODELIST=<unset>" in result.stderr


def test_torchrun_script_single_and_multi_node(fake_cluster):
    workdir, env, log = fake_cluster
    single = subprocess.run(["bash", "launch/torchrun.sh", "model=tiny"], cwd=workdir,
                            env={**env, "NPROC_PER_NODE": "2", "RUN_DIR": "runs/x"}, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    assert calls(log)[0][1:] == ["--standalone", "--nproc_per_node", "2", "train.py", "hydra.run.dir=runs/x",
                                 "model=tiny"]
    missing = subprocess.run(["bash", "launch/torchrun.sh"], cwd=workdir, env={**env, "NNODES": "2",
                             "NPROC_PER_NODE": "8", "RUN_DIR": "runs/y"}, capture_output=True, text=True)
    assert missing.returncode == 2 and "error: environment MASTER_ADDR=<unset>" in missing.stderr
    multi = subprocess.run(["bash", "launch/torchrun.sh"], cwd=workdir, env={**env, "NNODES": "2",
                           "NPROC_PER_NODE": "8", "RUN_DIR": "runs/y", "MASTER_ADDR": "node0"},
                           capture_output=True, text=True)
    assert multi.returncode == 0, multi.stderr
    argv = calls(log)[1]
    assert argv[1:9] == ["--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", "node0:29500", "--rdzv_id", "y"]


# ---------------------------------------------------------------------------------------------
# Paths that need CUDA: run wherever a GPU is available.

@pytest.mark.gpu
def test_fsdp_matches_one_process_on_gpu(tmp_path, cache_dir):
    nproc = torch.cuda.device_count()
    reference = run(None, tmp_path / "single", cache_dir, batch_size=4 * nproc, nproc=1)
    output = run("fsdp", tmp_path / "fsdp", cache_dir, nproc=nproc)
    assert "| fsdp x" in output, output[-3000:]
    ref, found = assert_completed(tmp_path / "single", reference), assert_completed(tmp_path / "fsdp", output)
    for step in range(1, STEPS + 1):
        assert found[step] == pytest.approx(ref[step], rel=1e-2), step  # bf16 autocast on the GPU
    norms, ref_norms = group_grad_norms(tmp_path / "fsdp"), group_grad_norms(tmp_path / "single")
    assert norms[1] == pytest.approx(ref_norms[1], rel=5e-2)  # the shards' squares summed over the ranks


@pytest.mark.gpu
def test_ddp_on_gpu_runs_bf16(tmp_path, cache_dir):
    output = run("ddp", tmp_path / "ddp", cache_dir, nproc=torch.cuda.device_count())
    assert "| bf16 |" in output, output[-3000:]
    assert_completed(tmp_path / "ddp", output)
