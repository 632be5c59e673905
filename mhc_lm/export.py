"""A trained model as a self-contained Hugging Face folder: weights, config, tokenizer, generation
config and the modeling code itself.

`save_export` writes what `save_pretrained` writes (safetensors, config.json, generation_config.json),
the tokenizer, `trainer_state.json` (step, tokens seen) when known, and the modeling code, with
`auto_map` in config.json, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
works in an environment where mhc_lm is not installed. train.py, eval.py and hub.py all export
through it.

The code bundle. transformers' remote-code loader copies only the files a module names in the form
`from .x import y`, from the same folder. Our model lives in a package (`mhc_lm.model` imports the
`mhc_lm.residual` package), so `bundle_modeling_code` flattens it: `mhc_lm/model.py` becomes
`modeling_mhc.py`, the package `mhc_lm/residual/__init__.py` becomes `residual.py`, and each module
`mhc_lm/residual/x.py` becomes `residual_x.py`, with every import of mhc_lm rewritten to the flat
names. Every module of `mhc_lm/residual/` is bundled (a new variant file needs no change here), plus
any other mhc_lm module they import. The optional kernels (`mhc_lm/kernels/`, triton) are never
bundled: their imports must sit in a `try: ... except ImportError:` and become `raise ImportError`,
so the exported model always runs the torch path. The entry file ends with one `from .x import
__name__` line per bundled file: that form is what the loader follows, so it copies all of them.
"""

from __future__ import annotations

import ast
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .run_dir import TRAINER_STATE

ENTRY_MODULE = "model"  # mhc_lm/model.py, the module that defines the config and model classes
ENTRY_FILE = "modeling_mhc"  # its name in the export
BUNDLED_PACKAGES = ("residual",)  # every module of these subpackages goes into the bundle
EXCLUDED_PACKAGES = ("kernels",)  # optional accelerated kernels: imported only under a guard, never bundled
# Third-party packages the bundled code may import outside a guard (the loader checks they are installed).
ALLOWED_IMPORTS = frozenset({"torch", "transformers", "numpy", "safetensors", "tokenizers", "huggingface_hub"})
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


class BundleError(RuntimeError):
    """The package's source cannot be flattened into a remote-code bundle (the message says where and why)."""


@dataclass
class SourceModule:
    name: str  # dotted, relative to the package: "model", "residual" (a package), "residual.hc"
    path: Path
    is_package: bool

    @property
    def flat(self) -> str:
        return ENTRY_FILE if self.name == ENTRY_MODULE else self.name.replace(".", "_")

    @property
    def package_parts(self) -> list[str]:
        """The package this module's relative imports start from (level 1), relative to the root."""
        parts = self.name.split(".")
        return parts if self.is_package else parts[:-1]


# ---------------------------------------------------------------------------------------------
# Export


def generation_config(config):
    """Sampling defaults for `generate` (a small LM loops under greedy decoding); eos/pad/bos from the model."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                            pad_token_id=config.pad_token_id, do_sample=True, temperature=0.8, top_k=50,
                            max_new_tokens=128)


@contextlib.contextmanager
def no_transformers_progress():
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_export(model, tokenizer, export_dir: str | Path, state_dict=None, trainer_state: dict | None = None,
                is_main_process: bool = True) -> Path:
    """Write `model` (an unwrapped PreTrainedModel) as a Hugging Face folder that carries its own code."""
    export_dir = Path(export_dir)
    model.generation_config = generation_config(model.config)
    with no_transformers_progress():  # "Writing model shards 1/1": not ours to show at the end of a run
        model.save_pretrained(export_dir, state_dict=state_dict, is_main_process=is_main_process,
                              safe_serialization=True)
    if is_main_process:
        tokenizer.save_pretrained(export_dir)
        if trainer_state is not None:
            (export_dir / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        bundle_modeling_code(export_dir, type(model.config).__name__, type(model).__name__)
    return export_dir


def export_model(accelerator, model, tokenizer, export_dir: str | Path, trainer_state: dict | None = None) -> Path:
    """`save_export` of a model prepared by accelerate: weights gathered from every rank, files written by rank 0."""
    save_export(accelerator.unwrap_model(model), tokenizer, export_dir, state_dict=accelerator.get_state_dict(model),
                trainer_state=trainer_state, is_main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    return Path(export_dir)


def has_bundled_code(folder: str | Path) -> bool:
    config = Path(folder) / "config.json"
    return config.exists() and "auto_map" in json.loads(config.read_text())


# ---------------------------------------------------------------------------------------------
# The code bundle


HEADER = "# Bundled by mhc_lm.export"


def bundle_modeling_code(export_dir: str | Path, config_class: str, model_class: str,
                         package_dir: str | Path | None = None) -> list[Path]:
    """Write the flattened modeling code of `package_dir` (default: mhc_lm) into `export_dir` and point
    config.json's `auto_map` at it. Returns the files written."""
    export_dir = Path(export_dir)
    for stale in export_dir.glob("*.py"):  # a previous bundle's files (a variant may have gone since)
        if stale.read_text(encoding="utf-8").startswith(HEADER):
            stale.unlink()
    written = write_bundle(export_dir, package_dir)
    config_path = export_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoConfig": f"{ENTRY_FILE}.{config_class}",
                          "AutoModelForCausalLM": f"{ENTRY_FILE}.{model_class}"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return written


def check_bundle(package_dir: str | Path | None = None) -> None:
    """Raise BundleError now if the code cannot be bundled (train.py calls it before training)."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        write_bundle(Path(scratch), package_dir)


def write_bundle(folder: Path, package_dir: str | Path | None = None) -> list[Path]:
    """Write the flat files and check, with transformers' own functions, that its loader copies them
    all and that they require nothing beyond ALLOWED_IMPORTS outside a guard."""
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    package_dir = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    written = []
    for flat, text in flatten_package(package_dir).items():
        path = folder / f"{flat}.py"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    entry = folder / f"{ENTRY_FILE}.py"
    reached = {Path(p).name for p in get_relative_import_files(entry)} | {entry.name}
    missing = sorted({p.name for p in written} - reached)
    if missing:
        raise BundleError(f"transformers' loader would not copy {', '.join(missing)}")
    stdlib = set(sys.stdlib_module_names)
    for path in written:
        required = set(get_imports(path)) - stdlib - ALLOWED_IMPORTS
        if required:
            raise BundleError(f"{path.name} imports {', '.join(sorted(required))} outside a try/except ImportError; "
                              f"the export may only require {', '.join(sorted(ALLOWED_IMPORTS))}")
    return written


def discover_modules(package_dir: Path) -> dict[str, SourceModule]:
    """The entry module and every module of the bundled subpackages, by dotted name."""
    found = {ENTRY_MODULE: SourceModule(ENTRY_MODULE, package_dir / f"{ENTRY_MODULE}.py", False)}
    for package in BUNDLED_PACKAGES:
        for path in sorted((package_dir / package).rglob("*.py")):
            parts = list(path.relative_to(package_dir).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            found[name] = SourceModule(name, path, is_package)
    return found


def flatten_package(package_dir: Path) -> dict[str, str]:
    """Flat file name -> rewritten source, for the entry module and everything it needs."""
    root = package_dir.name
    modules = discover_modules(package_dir)
    pending, texts = list(modules), {}
    while pending:
        name = pending.pop(0)
        texts[name], added = rewrite_module(modules[name], modules, root, package_dir)
        pending += added
    flat_names = {}
    for module in modules.values():
        if module.flat in flat_names:
            raise BundleError(f"{module.path} and {flat_names[module.flat]} would both be {module.flat}.py")
        flat_names[module.flat] = module.path
    manifest = [f"from .{modules[n].flat} import __name__ as _  # noqa: E402,F401"
                for n in sorted(modules) if n != ENTRY_MODULE]
    texts[ENTRY_MODULE] += ("\n\n# Every bundled file, in the import form transformers' remote-code loader follows, so it "
                            "copies them all.\n" + "\n".join(manifest) + "\n")
    return {modules[name].flat: text for name, text in texts.items()}


def module_at(package_dir: Path, name: str) -> SourceModule | None:
    """The module or package `name` (dotted, relative to the package), or None if there is none."""
    if not name:
        return None
    path = package_dir.joinpath(*name.split("."))
    if (path / "__init__.py").exists():
        return SourceModule(name, path / "__init__.py", True)
    if path.with_suffix(".py").exists():
        return SourceModule(name, path.with_suffix(".py"), False)
    return None


def import_target(module: SourceModule, node: ast.ImportFrom, root: str) -> str | None:
    """The dotted name (relative to the package) that `from X import ...` reads; None outside the package."""
    if node.level == 0:
        if node.module != root and not (node.module or "").startswith(root + "."):
            return None
        return node.module[len(root) + 1:]
    base = module.package_parts
    if node.level - 1 > len(base):
        raise BundleError(f"{module.path}:{node.lineno}: relative import beyond the {root} package")
    parts = base[: len(base) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    return ".".join(parts)


def is_excluded(target: str) -> bool:
    return any(target == p or target.startswith(p + ".") for p in EXCLUDED_PACKAGES)


def guarded_imports(tree: ast.Module):
    """Yield (import node, guarded): guarded when inside the body of a try that catches ImportError, or
    under `if TYPE_CHECKING:`."""

    def visit(node, guarded):
        for child in ast.iter_child_nodes(node):
            child_guarded = guarded
            if isinstance(node, ast.Try) and child in node.body:
                child_guarded = guarded or any(catches_import_error(h) for h in node.handlers)
            if isinstance(node, ast.If) and child in node.body:
                child_guarded = guarded or "TYPE_CHECKING" in ast.unparse(node.test)
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, child_guarded
            yield from visit(child, child_guarded)

    yield from visit(tree, False)


def catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in IMPORT_ERRORS for n in names)


def rewrite_module(module: SourceModule, modules: dict[str, SourceModule], root: str,
                   package_dir: Path) -> tuple[str, list[str]]:
    """The module's source with its mhc_lm imports rewritten to flat names, and the modules outside the
    bundled packages that it imports (added to `modules`, to be rewritten in turn)."""
    source = module.path.read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    edits, added = [], []
    for node, guarded in guarded_imports(ast.parse(source)):
        where = f"{module.path}:{node.lineno}"
        if isinstance(node, ast.Import):
            if any(a.name == root or a.name.startswith(root + ".") for a in node.names):
                raise BundleError(f"{where}: `import {root}...` cannot be bundled; use a relative import "
                                  f"(from .x import y)")
            continue
        target = import_target(module, node, root)
        if target is None:
            continue
        pieces = [f"{target}.{a.name}" if target else a.name for a in node.names]
        submodules = [p for p in pieces if module_at(package_dir, p) is not None]
        reads = set(submodules) | ({target} if len(submodules) < len(pieces) else set())
        if any(not r or is_excluded(r) for r in reads):  # the root package itself is never bundled
            if not guarded:
                name = ", ".join(sorted(f"{root}.{r}" if r else root for r in reads))
                raise BundleError(f"{where}: {name} is not part of the exported model; import it inside "
                                  "`try: ... except ImportError:` so that the torch path runs without it")
            message = f"{root}.{target} is not bundled with the exported model"
            edits.append((node, [f"raise ImportError({message!r})"]))
            continue
        for name in sorted(reads - set(modules)):
            modules[name] = module_at(package_dir, name)
            if modules[name] is None:
                raise BundleError(f"{where}: {root}.{name} is neither a module nor a package")
            added.append(name)
        edits.append((node, flat_import(node, target, modules)))
    for node, statements in sorted(edits, key=lambda e: -e[0].lineno):
        replace_statement(lines, node, statements, module.path)
    header = f"{HEADER} from {root}/{module.path.relative_to(package_dir)}; imports rewritten.\n"
    return header + "".join(lines), added


def flat_import(node: ast.ImportFrom, target: str, modules: dict[str, SourceModule]) -> list[str]:
    """`from <target> import a, b as c` in flat names: submodules as `from . import flat as a`."""
    statements, names = [], []
    for alias in node.names:
        sub = f"{target}.{alias.name}" if target else alias.name
        if sub in modules:
            statements.append(f"from . import {modules[sub].flat} as {alias.asname or alias.name}")
        else:
            names.append(alias.name + (f" as {alias.asname}" if alias.asname else ""))
    if names:
        statements.insert(0, f"from .{modules[target].flat} import {', '.join(names)}")
    return statements


def replace_statement(lines: list[str], node: ast.stmt, statements: list[str], path: Path) -> None:
    first, last = lines[node.lineno - 1], lines[node.end_lineno - 1]
    before, after = first[: node.col_offset], last[node.end_col_offset:].strip()
    if before.strip() or (after and not after.startswith("#")):
        raise BundleError(f"{path}:{node.lineno}: put this import on lines of its own")
    comment = f"  {after}" if after else ""
    new = "".join(f"{before}{s}{comment if i == 0 else ''}\n" for i, s in enumerate(statements))
    lines[node.lineno - 1: node.end_lineno] = [new]
