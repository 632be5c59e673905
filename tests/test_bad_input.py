"""Every bad input is one line on stderr naming the option, exit 2, before any work (issue 15).

One table of bad command lines: config values of every group, input files, checkpoints, paths and the launch
environment. Each case runs the checks train.py and eval.py run before any work, in process
(`mhc_lm.cli.check_command_line`, then train.py's `check_train`); a representative handful also runs the
real scripts, which must exit 2 with exactly one line on stderr, no traceback, and an empty data cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY_RUN
from mhc_lm.checkpoint import DEEPSPEED_TAG, save_checkpoint
from mhc_lm.cli import check_command_line, one_line
from mhc_lm.config import validate, validate_eval
from mhc_lm.errors import EXIT_BAD_INPUT, MhcError
from mhc_lm.preflight import check_train, run_config
from test_checkpoint import FakeAccelerator

GOOD = "good"  # a directory holding a good text file: the base of file cases
HUB = ["data=hub", "data.path=org/name"]


# (id, overrides, expected start of the message: the option it names), for train.py
CONFIG_CASES = [
    # Hydra's own errors
    ("max-steps-type", ["trainer.max_steps=abc"], "trainer.max_steps='abc'"),
    ("key-typo", ["trainer.maxsteps=10"], "trainer.maxsteps=10"),
    ("residual-key-typo", ["residual.sinkhorn_iter=5"], "residual.sinkhorn_iter=5"),
    ("residual-group", ["residual=foo"], "residual=foo"),
    ("model-group", ["model=huge"], "model=huge"),
    ("bool-type", ["trainer.compile=maybe"], "trainer.compile='maybe'"),
    ("added-key", ["+trainer.foo=1"], "trainer.foo=1"),
    ("not-an-override", ["trainer.max_steps"], "'trainer.max_steps'"),
    # trainer
    ("max-steps-0", ["trainer.max_steps=0"], "trainer.max_steps=0"),
    ("batch-0", ["trainer.batch_size=0"], "trainer.batch_size=0"),
    ("batch-negative", ["trainer.batch_size=-4"], "trainer.batch_size=-4"),
    ("grad-accum-0", ["trainer.grad_accum=0"], "trainer.grad_accum=0"),
    ("global-batch", ["trainer.global_batch_size=30"], "trainer.global_batch_size=30"),
    ("eval-every-0", ["trainer.eval_every=0"], "trainer.eval_every=0"),
    ("eval-batches-0", ["trainer.eval_batches=0"], "trainer.eval_batches=0"),
    ("ckpt-every-negative", ["trainer.ckpt_every=-1"], "trainer.ckpt_every=-1"),
    ("keep-last-0", ["trainer.keep_last=0"], "trainer.keep_last=0"),
    ("log-every-0", ["trainer.log_every=0"], "trainer.log_every=0"),
    ("seed-negative", ["trainer.seed=-1"], "trainer.seed=-1"),
    ("precision", ["trainer.precision=fp8"], "trainer.precision='fp8'"),
    ("threads-0", ["trainer.num_threads=0"], "trainer.num_threads=0"),
    ("stop-at-0", ["trainer.stop_at_step=0"], "trainer.stop_at_step=0"),
    ("resume-missing", ["trainer.resume=/nonexistent/run"], "trainer.resume='/nonexistent/run'"),
    # optim
    ("lr-negative", ["optim.lr=-1e-3"], "optim.lr=-0.001"),
    ("lr-0", ["optim.lr=0"], "optim.lr=0"),
    ("lr-nan", ["optim.lr=nan"], "optim.lr=nan"),
    ("min-lr-ratio", ["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio=1.5"),
    ("betas", ["optim.betas=[0.9,1.0]"], "optim.betas=[0.9, 1.0]"),
    ("eps-negative", ["optim.eps=-1e-8"], "optim.eps=-1e-08"),
    ("weight-decay-negative", ["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1"),
    ("warmup-negative", ["optim.warmup_steps=-5"], "optim.warmup_steps=-5"),
    ("decay-fraction-0", ["optim.decay_fraction=0"], "optim.decay_fraction=0"),
    ("clip-negative", ["optim.grad_clip=-1"], "optim.grad_clip=-1"),
    ("schedule", ["optim.schedule=linear"], "optim.schedule='linear'"),
    ("optimizer", ["optim.name=sgd"], "optim.name='sgd'"),
    # model
    ("d-model-0", ["model.d_model=0"], "model.d_model=0"),
    ("layers-0", ["model.n_layers=0"], "model.n_layers=0"),
    ("heads-indivisible", ["model.n_heads=3"], "model.n_heads=3"),
    ("kv-heads", ["model.n_kv_heads=3"], "model.n_kv_heads=3"),
    ("norm-eps-negative", ["model.norm_eps=-1e-6"], "model.norm_eps=-1e-06"),
    ("rope-theta-0", ["model.rope_theta=0"], "model.rope_theta=0"),
    ("init-std-negative", ["model.init_std=-0.02"], "model.init_std=-0.02"),
    ("vocab-1", ["model.vocab_size=1"], "model.vocab_size=1"),
    ("max-seq-len-0", ["model.max_seq_len=0"], "model.max_seq_len=0"),
    # residual
    ("streams-0", ["residual.n=0"], "residual.n=0"),
    ("sinkhorn-iters-0", ["residual.sinkhorn_iters=0"], "residual.sinkhorn_iters=0"),
    ("sinkhorn-eps-negative", ["residual.sinkhorn_eps=-1e-6"], "residual.sinkhorn_eps=-1e-06"),
    ("rms-eps-0", ["residual.rms_eps=0"], "residual.rms_eps=0"),
    ("hc-eps-negative", ["residual.hc_eps=-1"], "residual.hc_eps=-1"),
    ("scale-init-negative", ["residual.scale_init=-0.01"], "residual.scale_init=-0.01"),
    ("fn-init-std-negative", ["residual.fn_init_std=-1"], "residual.fn_init_std=-1"),
    ("res-init-strength-negative", ["residual.res_init_strength=-4"], "residual.res_init_strength=-4"),
    ("eps-as-text", ["residual.rms_eps=small"], "residual.rms_eps='small'"),
    ("collapse", ["residual.collapse=max"], "residual.collapse='max'"),
    ("collapse-eps-negative", ["residual.collapse_eps=-1e-6"], "residual.collapse_eps=-1e-06"),
    ("kernel", ["residual.kernel=cuda"], "residual.kernel='cuda'"),
    ("res-init", ["residual.res_init=random"], "residual.res_init='random'"),
    ("hc-iters-typo", ["residual=hc", "residual.sinkhorn_iters=5"], "residual.sinkhorn_iters=5"),
    # data
    ("seq-len-0", ["data.seq_len=0"], "data.seq_len=0"),
    ("seq-len-long", ["data.seq_len=4096"], "data.seq_len=4096"),
    ("val-fraction-0", ["data.val_fraction=0"], "data.val_fraction=0"),
    ("val-fraction-1.5", ["data.val_fraction=1.5"], "data.val_fraction=1.5"),
    ("bpe-vocab-small", ["data.vocab_size=100"], "data.vocab_size=100"),
    ("num-proc-0", ["data.num_proc=0"], "data.num_proc=0"),
    ("source", ["data.source=stream"], "data.source='stream'"),
    ("corpus", ["data.corpus=homer"], "data.corpus='homer'"),
    ("local-no-files", ["data=local", "data.files=[]"], "data.files=[]"),
    ("hub-no-path", ["data=hub"], "data.path=None"),
    ("hub-val-docs-0", [*HUB, "data.val_docs=0"], "data.val_docs=0"),
    ("hub-shuffle-buffer-negative", [*HUB, "data.shuffle_buffer=-1"], "data.shuffle_buffer=-1"),
    ("hub-prefetch-negative", [*HUB, "data.prefetch=-1"], "data.prefetch=-1"),
    ("shards-no-dir", ["data=shards"], "data.dir=None"),
    ("shards-missing-dir", ["data=shards", "data.dir=/nonexistent/shards"], "data.dir='/nonexistent/shards'"),
    # logger, hub
    ("logger-backend", ["logger.backend=tensorboard"], "logger.backend='tensorboard'"),
    ("wandb-mode", ["logger.mode=sometimes"], "logger.mode='sometimes'"),
    ("diag-every-negative", ["logger.diag_every=-1"], "logger.diag_every=-1"),
    ("diag-batch-0", ["logger.diag_batch_size=0"], "logger.diag_batch_size=0"),
    ("hub-push-no-repo", ["hub.push=true"], "hub.repo=None"),
    ("hub-revision", ["hub.revision=../x"], "hub.revision='../x'"),
    # input files
    ("empty-jsonl", ["data=local", "data.files=[{tmp}/empty.jsonl]"], "data.files='{tmp}/empty.jsonl'"),
    ("empty-txt", ["data=local", "data.files=[{tmp}/empty.txt]"], "data.files='{tmp}/empty.txt'"),
    ("blank-txt", ["data=local", "data.files=[{tmp}/blank.txt]"], "data.files='{tmp}/blank.txt'"),
    ("empty-train-with-val", ["data=local", "data.files=[{tmp}/empty.txt]", f"data.val_files=[{{tmp}}/{GOOD}/a.txt]"],
     "data.files='{tmp}/empty.txt'"),
    ("all-files-are-val", ["data=local", f"data.files=[{{tmp}}/{GOOD}]", f"data.val_files=[{{tmp}}/{GOOD}]"],
     "data.files=["),
    ("unknown-extension", ["data=local", "data.files=[{tmp}/table.csv]"], "data.files='{tmp}/table.csv'"),
    ("no-such-file", ["data=local", "data.files=[{tmp}/missing/*.txt]"], "data.files='{tmp}/missing/*.txt'"),
    ("file-format", ["data=local", f"data.files=[{{tmp}}/{GOOD}]", "data.format=xml"], "data.format='xml'"),
    ("tokenizer-missing", ["data.tokenizer=/nonexistent/tok"], "data.tokenizer='/nonexistent/tok'"),
    ("tokenizer-not-one", ["data.tokenizer={tmp}/" + GOOD], "data.tokenizer='{tmp}/" + GOOD + "'"),
    ("tokenizer-bad-name", ["data.tokenizer=not a name"], "data.tokenizer='not a name'"),
    # paths
    ("output-under-file", ["trainer.output_dir={tmp}/empty.txt/runs"], "trainer.output_dir='{tmp}/empty.txt/runs"),
    ("run-dir-under-file", ["hydra.run.dir={tmp}/empty.txt/run"], "hydra.run.dir='{tmp}/empty.txt/run'"),
    ("cache-under-file", ["data.cache_dir={tmp}/empty.txt/cache"], "data.cache_dir='{tmp}/empty.txt/cache'"),
    ("output-not-writable", ["trainer.output_dir={tmp}/readonly/runs"], "trainer.output_dir='{tmp}/readonly/runs"),
    # checkpoints (made by the `checkpoints` fixture)
    ("ckpt-truncated-weights", ["trainer.resume={tmp}/ckpt/truncated"], "trainer.resume='{tmp}/ckpt/truncated'"),
    ("ckpt-random-weights", ["trainer.resume={tmp}/ckpt/random"], "trainer.resume='{tmp}/ckpt/random'"),
    ("ckpt-truncated-optimizer", ["trainer.resume={tmp}/ckpt/optimizer"], "trainer.resume='{tmp}/ckpt/optimizer'"),
    ("ckpt-truncated-state", ["trainer.resume={tmp}/ckpt/state"], "trainer.resume='{tmp}/ckpt/state'"),
    ("ckpt-missing-weights", ["trainer.resume={tmp}/ckpt/missing"], "trainer.resume='{tmp}/ckpt/missing'"),
    ("ckpt-all-damaged", ["trainer.resume={tmp}/damaged_run"], "trainer.resume='{tmp}/damaged_run'"),
    ("ckpt-zero-one-process", ["trainer.resume={tmp}/ckpt/zero"], "trainer.resume='{tmp}/ckpt/zero'"),
    ("ckpt-other-variant", ["residual=hc", "trainer.resume={tmp}/ckpt/intact"], "residual.name='hc'"),
    ("ckpt-other-streams", ["residual.n=2", "trainer.resume={tmp}/ckpt/intact"], "residual.n=2"),
    # launch environment
    ("world-size-text", ["env:WORLD_SIZE=abc"], "environment WORLD_SIZE='abc'"),
    ("world-size-0", ["env:WORLD_SIZE=0"], "environment WORLD_SIZE='0'"),
    ("rendezvous-missing", ["env:WORLD_SIZE=2", "env:RANK=0"], "environment LOCAL_RANK=<unset>"),
    ("rank-out-of-range", ["env:WORLD_SIZE=2", "env:RANK=5", "env:LOCAL_RANK=0", "env:MASTER_ADDR=localhost",
                           "env:MASTER_PORT=29500"], "environment RANK=5"),
    ("master-port-text", ["env:WORLD_SIZE=2", "env:RANK=0", "env:LOCAL_RANK=0", "env:MASTER_ADDR=localhost",
                          "env:MASTER_PORT=http"], "environment MASTER_PORT='http'"),
]

EVAL_CASES = [
    ("eval-no-models", ["models=[]"], "models=[]"),
    ("eval-models-unset", [], "models=???"),
    ("eval-checkpoints", ["models=[x]", "checkpoints=some"], "checkpoints='some'"),
    ("eval-split", ["models=[x]", "split=test"], "split='test'"),
    ("eval-max-tokens", ["models=[x]", "max_tokens=1"], "max_tokens=1"),
    ("eval-batch-0", ["models=[x]", "batch_size=0"], "batch_size=0"),
    ("eval-temperature", ["models=[x]", "generate.temperature=-1"], "generate.temperature=-1"),
    ("eval-top-k", ["models=[x]", "generate.top_k=0"], "generate.top_k=0"),
    ("eval-seed", ["models=[x]", "generate.seed=-1"], "generate.seed=-1"),
    ("eval-fewshot", ["models=[x]", "lm_eval.num_fewshot=-1"], "lm_eval.num_fewshot=-1"),
    ("eval-limit", ["models=[x]", "lm_eval.limit=0"], "lm_eval.limit=0"),
    ("eval-include-path", ["models=[x]", "lm_eval.include_path=/nonexistent"], "lm_eval.include_path='/nonexistent'"),
    ("eval-output-under-file", ["models=[x]", "output_dir={tmp}/empty.txt/evals"], "output_dir='{tmp}/empty.txt/evals"),
]

CASES = [("config", *case) for case in CONFIG_CASES] + [("eval", *case) for case in EVAL_CASES]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Files and checkpoints the cases name: empty, blank and odd files, a directory that is not a tokenizer,
    and checkpoints of the tiny config, intact and damaged in each way."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / GOOD).mkdir()
    (tmp / GOOD / "a.txt").write_text("To be, or not to be.\n")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "empty.txt").write_text("")
    (tmp / "blank.txt").write_text(" \n\n")
    (tmp / "table.csv").write_text("text\nhello\n")
    (tmp / "readonly").mkdir()
    make_checkpoints(tmp)
    return tmp


def make_checkpoints(tmp: Path) -> None:
    cfg, _ = check_command_line("config", [*TINY_RUN, f"trainer.output_dir={tmp}/runs"])
    runs = {name: tmp / "ckpt_runs" / name for name in ("intact", "truncated", "random", "optimizer", "state",
                                                         "missing", "zero")}
    for name, run_dir in runs.items():
        path = save_checkpoint(FakeAccelerator(), run_dir, 4, {"step": 4, "tokens_seen": 0, "train_time": 0.0},
                               {"position": 0}, run_config(cfg), keep_last=2)
        (tmp / "ckpt").mkdir(exist_ok=True)
        (tmp / "ckpt" / name).symlink_to(path)
    ckpt = tmp / "ckpt"
    for name, file in (("truncated", "model.safetensors"), ("optimizer", "optimizer.bin"),
                       ("state", "trainer_state.json")):
        data = (ckpt / name / file).read_bytes()
        (ckpt / name / file).write_bytes(data[: len(data) // 2])
    (ckpt / "random" / "model.safetensors").write_bytes(os.urandom((ckpt / "random" / "model.safetensors").stat().st_size))
    (ckpt / "missing" / "model.safetensors").unlink()
    # ZeRO: DeepSpeed's folder and two ranks' data states, listed in the manifest like any other file
    zero = ckpt / "zero"
    (zero / DEEPSPEED_TAG).mkdir()
    (zero / DEEPSPEED_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"shard")
    shutil.copy(zero / "data_state_rank0.json", zero / "data_state_rank1.json")
    manifest = zero / "manifest.json"
    manifest.unlink()
    from mhc_lm.checkpoint import write_manifest

    write_manifest(zero.resolve())
    damaged_run = tmp / "damaged_run" / "checkpoints"
    damaged_run.mkdir(parents=True)
    shutil.copytree(ckpt / "truncated", damaged_run / "step_000004")


def expand(items: list[str], tmp: Path) -> tuple[list[str], dict[str, str]]:
    """(overrides, environment) of a case, `{tmp}` filled in; `env:NAME=VALUE` items are the environment."""
    items = [i.replace("{tmp}", str(tmp)) for i in items]
    env = dict(i[4:].split("=", 1) for i in items if i.startswith("env:"))
    return [i for i in items if not i.startswith("env:")], env


def base_overrides(config: str, tmp: Path, case_id: str) -> list[str]:
    if config == "eval":
        return [f"output_dir={tmp}/evals", f"data.cache_dir={tmp}/cache/{case_id}"]
    return [*TINY_RUN, f"trainer.output_dir={tmp}/runs", f"data.cache_dir={tmp}/cache/{case_id}",
            "trainer.run_name=bad"]


def check_in_process(config: str, overrides: list[str]) -> None:
    """What train.py / eval.py check before any work."""
    if config == "eval":
        check_command_line("eval", overrides, validate_eval, "output_dir")
        return
    cfg, run_dir = check_command_line("config", overrides, validate, "trainer.output_dir")
    check_train(cfg, run_dir)


LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("config,case_id,items,expected", CASES, ids=[c[1] for c in CASES])
def test_bad_input_is_one_line_naming_the_option_with_exit_2(inputs, monkeypatch, config, case_id, items, expected):
    overrides, env = expand(items, inputs)
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    if case_id == "output-not-writable":  # tests run as root, for whom every directory is writable
        readonly = str(inputs / "readonly")
        real_access = os.access
        monkeypatch.setattr("mhc_lm.errors.os.access", lambda p, mode: str(p) != readonly and real_access(p, mode))
    with pytest.raises(MhcError) as err:
        check_in_process(config, [*base_overrides(config, inputs, case_id), *overrides])
    message = str(err.value)
    assert err.value.exit_code == EXIT_BAD_INPUT
    assert "\n" not in message and one_line(message) == message
    assert message.startswith(expected.replace("{tmp}", str(inputs))), message
    assert not (inputs / "cache" / case_id).exists()  # nothing tokenized
    assert not list((inputs / "runs").glob("*/checkpoints"))  # nothing trained


# The real scripts, for a representative handful: one line on stderr, exit 2, nothing written to the cache.
# One per place a check runs: Hydra's composition, the options' check in cli.run, train.py's check_train
# (checkpoint and environment, inside the Hydra task), and eval.py. Each train.py start costs 5-15 s of imports.
SPAWNED = ["max-steps-type", "empty-jsonl", "ckpt-truncated-weights", "eval-temperature"]


@pytest.mark.parametrize("case_id", SPAWNED)
def test_the_scripts_exit_2_with_one_line_before_any_work(inputs, case_id):
    config, _, items, expected = next(c for c in CASES if c[1] == case_id)
    overrides, env = expand(items, inputs)
    full_env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    full_env.update(env, MHC_LM_CACHE=str(inputs / "cache" / case_id))
    script = "eval.py" if config == "eval" else "train.py"
    result = subprocess.run([sys.executable, str(ROOT / script), *base_overrides(config, inputs, case_id),
                             *overrides], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith("error: " + expected.replace("{tmp}", str(inputs)))
    assert "Tokenizing" not in result.stdout + result.stderr
    assert not (inputs / "cache" / case_id).exists() or not any((inputs / "cache" / case_id).iterdir())


def test_the_table_covers_every_kind_of_input():
    groups = {c[3].split("=")[0].split(".")[0].strip("'") for c in CASES}
    assert len(CASES) >= 50
    assert {"trainer", "optim", "model", "residual", "data", "logger", "hub", "models"} <= groups
    assert any("ckpt" in c[1] for c in CASES) and any("env:" in i for c in CASES for i in c[2])
    assert json.dumps(CASES)  # plain data: the table is the documentation of what is refused
