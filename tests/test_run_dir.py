"""The run directory's layout has one owner (mhc_lm/run_dir.py): its file names are spelled there only."""

from __future__ import annotations

import ast
from pathlib import Path

from mhc_lm.run_dir import RunDir, step_dirs, step_name, step_of

ROOT = Path(__file__).resolve().parents[1]
LAYOUT_NAMES = ("trainer_state.json", "run_config.json", "metrics.jsonl", ".hydra", "step_", "checkpoints")


def path_parts(tree: ast.AST):
    """The string pieces joined into paths with `/` (messages and docstrings may name the files)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                for piece in ast.walk(side):
                    if isinstance(piece, ast.Constant) and isinstance(piece.value, str):
                        yield node.lineno, piece.value


def test_the_layouts_names_are_spelled_only_in_run_dir():
    sources = [*ROOT.joinpath("mhc_lm").rglob("*.py"), ROOT / "train.py", ROOT / "eval.py"]
    offenders = [f"{path.relative_to(ROOT)}:{line}: {text!r}"
                 for path in sources if path.name != "run_dir.py"
                 for line, text in path_parts(ast.parse(path.read_text()))
                 if any(name in text for name in LAYOUT_NAMES)]
    assert offenders == []


def test_steps_sort_by_number_not_by_name_and_ignore_partial_and_foreign_folders(tmp_path):
    run = RunDir(tmp_path)
    for name in ("step_000010", "step_000002", "step_100000", ".tmp-step_000011", "step_x", "notes"):
        (run.checkpoints / name).mkdir(parents=True)
    (run.checkpoints / "step_000003").write_text("a file, not a checkpoint")
    assert [p.name for p in run.list_checkpoints()] == ["step_000002", "step_000010", "step_100000"]
    assert [step_of(p) for p in run.list_checkpoints()] == [2, 10, 100000]
    assert step_of(Path("x/.tmp-step_000011")) is None
    assert run.checkpoint(12) == tmp_path / "checkpoints" / step_name(12) == tmp_path / "checkpoints" / "step_000012"
    assert run.partial_checkpoint(12).name == ".tmp-step_000012"
    assert step_dirs(tmp_path / "absent") == []


def test_a_folder_is_a_run_once_it_has_checkpoints_or_metrics(tmp_path):
    assert not RunDir(tmp_path).looks_like_a_run()
    RunDir(tmp_path).metrics.write_text("{}\n")
    assert RunDir(tmp_path).looks_like_a_run()
    other = RunDir(tmp_path / "other")
    other.checkpoint(4).mkdir(parents=True)
    assert other.looks_like_a_run() and other.diagnostics_at(4) == tmp_path / "other" / "diagnostics" / "step_000004"
