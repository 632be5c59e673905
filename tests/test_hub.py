"""Pushing to the Hub with huggingface_hub's HTTP calls mocked (and HF_HUB_OFFLINE=1, so anything not
mocked would fail): which files go up, the model card, branches, and the errors that come first."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import hf_raise_for_status

from mhc_lm.data import SOURCES
from mhc_lm.errors import ConfigError
from mhc_lm.hub import data_section
from mhc_lm.hub import main as hub_main
from mhc_lm.hub import push

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "trainer_state.json", "modeling_mhc.py", "residual.py", "errors.py"}


def http_error(status: int, error_code: str | None = None):
    """The exception huggingface_hub raises for this HTTP answer, built by its own hf_raise_for_status."""
    from huggingface_hub.errors import Response  # the HTTP library huggingface_hub uses

    http = importlib.import_module(Response.__module__.split(".")[0])
    headers = {"X-Error-Code": error_code} if error_code else {}
    response = http.Response(status, headers=headers, request=http.Request("GET", "https://huggingface.co/api/x"))
    try:
        hf_raise_for_status(response)
    except HfHubHTTPError as err:
        return err
    raise AssertionError("no error raised")


class FakeHub:
    """Records the calls of the HfApi methods that talk to the Hub; each behaves as configured."""

    def __init__(self, monkeypatch, whoami=None, auth_check_error=None, create_repo_error=None):
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        self.whoami_result = whoami or {"name": "alice", "orgs": [{"name": "lab", "roleInOrg": "write"}],
                                        "auth": {"accessToken": {"role": "write"}}}
        self.auth_check_error, self.create_repo_error = auth_check_error, create_repo_error
        for name in ("whoami", "auth_check", "create_repo", "create_branch", "create_commit", "upload_folder",
                     "upload_file", "preupload_lfs_files"):
            monkeypatch.setattr(HfApi, name, self.method(name))

    def method(self, name):
        def call(api, *args, **kwargs):
            self.calls.append((name, {"args": args, **kwargs}))
            return getattr(self, f"do_{name}", self.unexpected)(*args, **kwargs)

        return call

    def unexpected(self, *args, **kwargs):
        raise AssertionError("an unexpected Hub call")

    def do_whoami(self, *args, **kwargs):
        return self.whoami_result

    def do_auth_check(self, repo_id, **kwargs):
        if self.auth_check_error is not None:
            raise self.auth_check_error

    def do_create_repo(self, repo_id, **kwargs):
        if self.create_repo_error is not None:
            raise self.create_repo_error
        return f"https://huggingface.co/{repo_id}"

    def do_create_branch(self, repo_id, **kwargs):
        return None

    def do_create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            self.uploaded[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def kwargs(self, name: str) -> dict:
        return next(kw for n, kw in self.calls if n == name)


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")


@pytest.fixture
def run_with_diagnostics(tiny_run, tmp_path):
    """A copy of the tiny run with diagnostics pictures at steps 4 and 8 (as the diagnostics module writes)."""
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "diagnostics", ignore_errors=True)  # the run's own (final step): replaced by known files
    for step in (4, 8):
        folder = run / "diagnostics" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        (folder / "h_res.png").write_bytes(PNG)
        (folder / f"gains_{step}.png").write_bytes(PNG)
        (folder / "diagnostics.json").write_text(json.dumps({"step": step}))
    return run


def test_push_of_a_run_uploads_the_export_and_a_model_card(run_with_diagnostics, token, monkeypatch):
    hub = FakeHub(monkeypatch)
    url = push(str(run_with_diagnostics), "alice/tiny-mhc", private=True)
    assert url == "https://huggingface.co/alice/tiny-mhc/commit/abc"
    assert hub.names() == ["whoami", "auth_check", "create_repo", "create_commit"]
    assert hub.kwargs("create_repo")["private"] is True and hub.kwargs("create_commit")["revision"] is None
    export = run_with_diagnostics / "export"
    residual_files = {p.name for p in export.glob("residual_*.py")}
    assert set(hub.uploaded) == EXPORT_FILES | residual_files | {
        "README.md", "diagnostics/h_res.png", "diagnostics/gains_8.png", "diagnostics/diagnostics.json"}
    assert hub.uploaded["model.safetensors"] == (export / "model.safetensors").read_bytes()
    assert json.loads(hub.uploaded["diagnostics/diagnostics.json"]) == {"step": 8}  # the final model's step
    card = hub.uploaded["README.md"].decode()
    assert card.startswith("---\n") and "library_name: transformers" in card and "custom_code" in card
    assert 'from_pretrained("alice/tiny-mhc", trust_remote_code=True)' in card
    assert "Step 8, 1,024 tokens seen." in card
    assert "max_steps: 8" in card  # the training config
    assert "bundled corpus `shakespeare`" in card and "blocks of 32 tokens" in card
    val_loss = [json.loads(line) for line in (run_with_diagnostics / "metrics.jsonl").read_text().splitlines()]
    final = next(m["final/val_loss"] for m in val_loss if "final/val_loss" in m)
    assert f"| final/val_loss | {final:.4f} |" in card
    assert "![h_res](diagnostics/h_res.png)" in card and "![gains_8](diagnostics/gains_8.png)" in card


def test_push_of_a_checkpoint_exports_it_to_a_branch(run_with_diagnostics, token, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    hub = FakeHub(monkeypatch)
    checkpoint = run_with_diagnostics / "checkpoints" / "step_000004"
    push(str(checkpoint), "lab/tiny-mhc", revision="step-4")
    assert hub.names() == ["whoami", "auth_check", "create_repo", "create_branch", "create_commit"]
    assert hub.kwargs("create_branch")["branch"] == "step-4" and hub.kwargs("create_commit")["revision"] == "step-4"
    assert "diagnostics/gains_4.png" in hub.uploaded and "diagnostics/gains_8.png" not in hub.uploaded
    assert json.loads(hub.uploaded["trainer_state.json"])["step"] == 4
    assert "auto_map" in json.loads(hub.uploaded["config.json"])
    (tmp_path / "up.safetensors").write_bytes(hub.uploaded["model.safetensors"])
    uploaded, saved = load_file(tmp_path / "up.safetensors"), load_file(checkpoint / "model.safetensors")
    assert set(saved) <= set(uploaded)
    assert all(torch.equal(uploaded[k], saved[k]) for k in saved)
    assert "Step 4, 512 tokens seen." in hub.uploaded["README.md"].decode()


def test_a_missing_token_is_an_error_before_any_hub_call(tiny_run, monkeypatch):
    hub = FakeHub(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError, match=r"--repo='alice/x': no Hugging Face token found; allowed: log in"):
        push(str(tiny_run), "alice/x")
    assert hub.calls == []


@pytest.mark.parametrize("setup,message", [
    ({"whoami": {"name": "alice", "orgs": [], "auth": {"accessToken": {"role": "read"}}}},
     "the token of alice is read-only"),
    ({"auth_check_error": "403"}, "alice cannot write to it"),
    ({"auth_check_error": "404"}, "alice cannot create repositories there; allowed: a repository under alice, lab"),
    ({"whoami_error": "401"}, "the Hub refused the token"),
    ({"create_repo_error": "403", "auth_check_error": "404", "repo": "lab/x"}, "the Hub refused to create it"),
])
def test_an_unwritable_repository_is_an_error_before_any_upload(tiny_run, token, monkeypatch, setup, message):
    errors = {"403": http_error(403), "404": http_error(404, "RepoNotFound"), "401": http_error(401)}
    assert isinstance(errors["404"], RepositoryNotFoundError)
    hub = FakeHub(monkeypatch, whoami=setup.get("whoami"), auth_check_error=errors.get(setup.get("auth_check_error")),
                  create_repo_error=errors.get(setup.get("create_repo_error")))
    if "whoami_error" in setup:
        hub.do_whoami = lambda *a, **k: (_ for _ in ()).throw(errors[setup["whoami_error"]])
    with pytest.raises(ConfigError, match=message):
        push(str(tiny_run), setup.get("repo", "someone-else/x"))
    assert "create_commit" not in hub.names()


def test_the_cli_reports_errors_with_exit_code_2(tiny_run, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert hub_main(["push", str(tiny_run), "--repo", "not a repo"]) == 2
    assert "error: --repo='not a repo': allowed: a Hub repository id USER/NAME" in capsys.readouterr().err
    assert hub_main(["push", str(tiny_run), "--repo", "alice/x", "--revision", "bad..name"]) == 2
    assert "error: --revision='bad..name'" in capsys.readouterr().err
    assert hub_main(["push", "/nonexistent/run", "--repo", "alice/x"]) == 2
    assert "error: source='/nonexistent/run': no such directory" in capsys.readouterr().err
    assert hub_main(["push", str(tiny_run), "--repo", "alice/x"]) == 2
    assert "no Hugging Face token found" in capsys.readouterr().err


def test_training_with_hub_push_and_no_token_stops_before_any_work(train_cli, tmp_path):
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf-home")}
    result = train_cli("hub.push=true", "hub.repo=alice/x", "trainer.max_steps=2", "trainer.run_name=nohub", env=env)
    assert result.returncode == 2
    assert "error: hub.repo='alice/x': no Hugging Face token found" in result.stderr
    assert "Tokenizing" not in result.stderr and not (tmp_path / "runs" / "nohub" / "checkpoints").exists()
    bad = train_cli("hub.push=true", "trainer.run_name=nohub", env=env)
    assert bad.returncode == 2 and "error: hub.repo=None: allowed: a Hub repository id" in bad.stderr


# One saved `data` section that names a value for every source's options; each card must name its own.
CARD_DATA = {"corpus": "shakespeare", "files": ["corpus/*.txt"], "val_files": [], "path": "HuggingFaceFW/fineweb-edu",
             "name": "sample-10BT", "split": "train", "val_split": None, "val_docs": 256, "dir": "/data/shards",
             "seq_len": 256, "tokenizer": "bpe", "vocab_size": 4096}
CARD_TEXT = {"bundled": "the bundled corpus `shakespeare`", "local": "local files ['corpus/*.txt']",
             "hub": "the dataset `HuggingFaceFW/fineweb-edu` (sample-10BT), split `train`, streamed",
             "shards": "pre-tokenized shards in `/data/shards`"}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_the_model_card_names_the_data_of_every_source(name):
    assert set(CARD_TEXT) == set(SOURCES)  # a new source needs its expected sentence here
    (line,) = data_section(yaml.safe_dump({"data": {"source": name, **CARD_DATA}}))
    assert line.startswith(f"Trained on {CARD_TEXT[name]}") and "blocks of 256 tokens" in line
    assert not any(text in line for other, text in CARD_TEXT.items() if other != name)


def test_the_model_card_without_a_recorded_data_section():
    assert data_section("") == data_section(yaml.safe_dump({"data": {"source": "gone"}})) == \
        ["Not recorded with this model."]
