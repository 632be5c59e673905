"""The export carries its modeling code: it loads with trust_remote_code where mhc_lm is not installed,
with the same logits, and the bundle picks up new residual modules and drops guarded kernel imports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

import mhc_lm
from mhc_lm.export import BundleError, bundle_modeling_code, check_bundle, flatten_package

PACKAGE = Path(mhc_lm.__file__).resolve().parent

# A variant module written after the bundler: it must be bundled with no change to mhc_lm.export, and
# its optional kernel import (guarded, as the kernels package must be) must not be required.
PROBE_MODULE = '''
"""A late variant: the plain residual under another name, with an optional kernel."""
from __future__ import annotations

import dataclasses

try:
    from ..kernels.probe import fused_probe  # optional: never part of an export
except ImportError:
    fused_probe = None

from .registry import register
from .residual import ResidualMixer


@dataclasses.dataclass
class ProbeOptions:
    pass


@register("probe", ProbeOptions)
class ProbeMixer(ResidualMixer):
    pass
'''


def copy_package(tmp_path: Path, extra: dict[str, str]) -> Path:
    """A copy of the mhc_lm source tree with extra files (relative path -> text)."""
    package = tmp_path / "src" / "mhc_lm"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    for name, text in extra.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def isolated_python(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `script` in a Python that sees site-packages but not mhc_lm: -S skips site's .pth files (the
    editable install's finder), PYTHONPATH names site-packages only, cwd is not the repository."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "PYTHONPATH": sysconfig.get_paths()["purelib"],
           "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-S", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.compat
def test_export_loads_with_trust_remote_code_without_mhc_lm(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    export = tmp_path / "export"
    shutil.copytree(tiny_run / "export", export)
    package = copy_package(tmp_path, {"residual/zz_probe.py": PROBE_MODULE})
    written = bundle_modeling_code(export, "MhcConfig", "MhcForCausalLM", package_dir=package)
    residual_modules = {p.stem for p in (PACKAGE / "residual").glob("*.py")} - {"__init__"}
    assert {p.name for p in written} == {"modeling_mhc.py", "residual.py", "residual_zz_probe.py", "errors.py",
                                         *(f"residual_{m}.py" for m in residual_modules)}  # errors: the leaf
    assert "raise ImportError" in (export / "residual_zz_probe.py").read_text()
    config = json.loads((export / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mhc.MhcForCausalLM"

    ids = [[5, 17, 3, 200, 42, 7, 99, 1]]
    script = textwrap.dedent(f"""
        import importlib.util, sys
        import torch
        assert importlib.util.find_spec("mhc_lm") is None, "mhc_lm is importable"
        torch.set_num_threads(1)
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(export)!r}, trust_remote_code=True).eval()
        bundle = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".residual"]
        probe = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".residual_zz_probe"]
        assert "probe" in bundle.MIXERS and probe.fused_probe is None
        with torch.no_grad():
            torch.save(model(torch.tensor({ids})).logits, {str(tmp_path / "remote.pt")!r})
        print(type(model).__module__)
    """)
    result = isolated_python(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("transformers_modules.")

    import mhc_lm.model  # noqa: F401  (registers the architecture: the in-process model is mhc_lm's own)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(export).eval()
        assert type(model).__module__ == "mhc_lm.model"
        with torch.no_grad():
            local = model(torch.tensor(ids)).logits
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.load(tmp_path / "remote.pt"), local)


def test_an_isolated_python_cannot_import_mhc_lm(tmp_path):
    result = isolated_python("import mhc_lm", tmp_path)
    assert result.returncode != 0 and "No module named 'mhc_lm'" in result.stderr


def test_an_unguarded_kernel_import_is_refused_before_any_export(tmp_path):
    package = copy_package(tmp_path, {"residual/fast.py": "from ..kernels import fused  # noqa\n"})
    with pytest.raises(BundleError, match=r"fast.py:1: mhc_lm.kernels is not part of the exported model; import it "
                                          r"inside `try: ... except ImportError:`"):
        check_bundle(package)  # what train.py runs before training
    check_bundle()  # mhc_lm itself bundles


def test_a_new_bundle_replaces_the_files_of_an_old_one(tiny_run, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(tiny_run / "export", export)
    (export / "notes.py").write_text("# the user's own file\n")
    package = copy_package(tmp_path, {"residual/zz_probe.py": PROBE_MODULE})
    bundle_modeling_code(export, "MhcConfig", "MhcForCausalLM", package_dir=package)
    assert (export / "residual_zz_probe.py").exists()
    bundle_modeling_code(export, "MhcConfig", "MhcForCausalLM")  # the variant is gone from mhc_lm
    assert not (export / "residual_zz_probe.py").exists() and (export / "notes.py").exists()


def test_modules_outside_the_residual_package_are_bundled_when_imported(tmp_path):
    helper = "def double(x):\n    return 2 * x\n"
    user = "from ..helpers.maths import double  # noqa: F401\n"
    package = copy_package(tmp_path, {"helpers/__init__.py": "", "helpers/maths.py": helper,
                                      "residual/uses_helper.py": user})
    files = flatten_package(package)
    assert files["residual_uses_helper"].splitlines()[1] == "from .helpers_maths import double  # noqa: F401"
    assert files["helpers_maths"].endswith(helper)
    assert "from .helpers_maths import __name__ as _" in files["modeling_mhc"]
