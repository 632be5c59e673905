"""Publish a run, a checkpoint or an export to the Hugging Face Hub.

    python -m mhc_lm.hub push runs/my-run --repo USER/NAME [--private] [--revision step-1000]

What goes up: the exported model (safetensors weights, config.json with `auto_map`, the flattened
modeling code, generation_config.json, the tokenizer, trainer_state.json) and a model card (README.md:
the architecture, the training config, the data, the final metrics, and the diagnostics pictures of
`RUN/diagnostics/step_N/` when the run has them, uploaded under `diagnostics/`). A checkpoint is exported
on the fly. `--revision` puts the commit on a branch (created from main if needed): intermediate
checkpoints go to branches such as `step-1000`.

Before anything is created or uploaded, `check_push_access` makes sure there is a token, that the Hub
accepts it, that it is not read-only, and that it may write to the repository (or create it in that
namespace); otherwise a ConfigError says what is wrong. train.py calls the same check before training
when `hub.push=true`, and `push` at the end (main process only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

import yaml

from .config import check_repo_id, check_revision
from .data import SOURCES
from .errors import ConfigError
from .model_sources import ModelSource, resolve_sources
from .run_dir import RUN_CONFIG, RunDir, step_of

WRITE_ROLES = ("admin", "write", "contributor")  # roles in an organization that may create and push repos


# ---------------------------------------------------------------------------------------------
# Access


def network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub's HTTP client raises when the Hub cannot be reached (no route, refused, timed out):
    OSError (requests), and the transport errors of httpx / httpx2, whichever the installed hub uses."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for client in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def check_push_access(repo: str, option: str = "--repo") -> str:
    """Raise ConfigError unless a token can write to `repo` (or create it); return the account name."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    token = get_token()
    if not token:
        raise ConfigError(f"{option}={repo!r}: no Hugging Face token found; allowed: log in with `hf auth login` "
                          "or set HF_TOKEN to a token with write access")
    api = HfApi(token=token)
    try:
        info = api.whoami()
    except OfflineModeIsEnabled:
        raise ConfigError(f"{option}={repo!r}: HF_HUB_OFFLINE is set, so nothing can be pushed; allowed: "
                          "unset HF_HUB_OFFLINE") from None
    except HfHubHTTPError as err:  # an answer (it is also an OSError: caught before the network errors)
        raise ConfigError(f"{option}={repo!r}: the Hub refused the token ({err}); allowed: a valid token "
                          "with write access (hf auth login)") from None
    except network_errors() as err:
        raise ConfigError(f"{option}={repo!r}: the Hub at {api.endpoint} is unreachable ({type(err).__name__}: "
                          f"{err}); allowed: a network that reaches the Hub (or HF_ENDPOINT), or no push") from None
    role = (info.get("auth") or {}).get("accessToken", {}).get("role")
    if role == "read":
        raise ConfigError(f"{option}={repo!r}: the token of {info.get('name')} is read-only; allowed: a token "
                          "with write access")
    try:
        api.auth_check(repo, write=True)
        return info["name"]
    except GatedRepoError as err:
        raise ConfigError(f"{option}={repo!r}: no write access ({err}); allowed: a repository you can write to") \
            from None
    except RepositoryNotFoundError:
        pass  # not created yet (or invisible to this token): the namespace must be ours
    except HfHubHTTPError as err:
        raise ConfigError(f"{option}={repo!r}: {info.get('name')} cannot write to it ({err}); allowed: "
                          "a repository you can write to") from None
    namespaces = [info["name"]] + [o["name"] for o in info.get("orgs", []) if o.get("roleInOrg") in WRITE_ROLES]
    if repo.split("/")[0] not in namespaces:
        raise ConfigError(f"{option}={repo!r}: {info['name']} cannot create repositories there; allowed: "
                          f"a repository under {', '.join(namespaces)}")
    return info["name"]


# ---------------------------------------------------------------------------------------------
# What goes up


def push_source(spec: str) -> ModelSource:
    """The model a push names: a checkpoint, an export, or a run (its export, else its newest checkpoint)."""
    if not Path(spec).expanduser().is_dir():
        raise ConfigError(f"source={spec!r}: no such directory; allowed: RUN, RUN/checkpoints/step_N or RUN/export")
    return resolve_sources(spec, "last", option="source")[0]


def diagnostics_pictures(run_dir: Optional[Path], step: Optional[int]) -> list[Path]:
    """PNGs (and the summary JSON) of RUN/diagnostics/step_M for the newest M <= step (any M if unknown)."""
    if run_dir is None:
        return []
    folders = [p for p in RunDir(run_dir).list_diagnostics() if step is None or step_of(p) <= step]
    if not folders:
        return []
    folder = folders[-1]
    return sorted(folder.glob("*.png")) + sorted(folder.glob("diagnostics.json"))


def upload_files(source: ModelSource, scratch: Path, repo: str) -> dict[str, Path]:
    """path in the repository -> local file, README.md included."""
    folder = source.export_folder(scratch)
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
             if p.is_file() and not any(part.startswith((".", "__pycache__")) for part in p.relative_to(folder).parts)}
    for picture in diagnostics_pictures(source.run_dir, source.step):
        files[f"diagnostics/{picture.name}"] = picture
    card = scratch / "README.md"
    card.write_text(model_card(source, folder, repo, sorted(files)))
    files["README.md"] = card
    return files


# ---------------------------------------------------------------------------------------------
# The model card


def final_metrics(run_dir: Optional[Path], step: Optional[int]) -> dict[str, float]:
    """The last value of each logged metric at or before `step`, from RUN/metrics.jsonl."""
    path = RunDir(run_dir).metrics if run_dir is not None else None
    if path is None or not path.exists():
        return {}
    latest: dict[str, float] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if step is None or record.get("step", 0) <= step:
            latest.update({k: v for k, v in record.items() if k != "step"})
    return latest


def training_config_text(source: ModelSource) -> str:
    run_dir = source.run_dir
    if run_dir is not None and RunDir(run_dir).hydra_config.exists():
        return RunDir(run_dir).hydra_config.read_text()
    run_config = Path(source.location) / RUN_CONFIG
    return run_config.read_text() if run_config.exists() else ""


def data_section(config_text: str) -> list[str]:
    """A sentence about the training data, from the training config."""
    try:
        data = (yaml.safe_load(config_text) or {}).get("data")
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict) or data.get("source", "bundled") not in SOURCES:
        return ["Not recorded with this model."]
    what = SOURCES[data.get("source", "bundled")].card_text(data)
    return [f"Trained on {what}; blocks of {data.get('seq_len')} tokens; tokenizer `{data.get('tokenizer')}`"
            f"{' with ' + str(data.get('vocab_size')) + ' tokens' if data.get('tokenizer') == 'bpe' else ''}."]


def model_card(source: ModelSource, folder: Path, repo: str, paths: list[str]) -> str:
    from huggingface_hub import ModelCardData

    config = json.loads((folder / "config.json").read_text())
    residual = config.get("residual", {})
    metrics = final_metrics(source.run_dir, source.step)
    config_text = training_config_text(source)
    header = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                           tags=["mhc-lm", "hyper-connections", f"residual-{residual.get('name')}", "custom_code"])
    lines = [f"---\n{header.to_yaml()}\n---", "", f"# {repo.split('/')[-1]}", "",
             f"A GPT whose residual connections are `{residual.get('name')}` with n = {residual.get('n')} streams, "
             "trained with mhc-lm. The modeling code travels with the weights (`trust_remote_code=True`):", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)',
             f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
             'ids = tokenizer("ROMEO:", return_tensors="pt").input_ids',
             "print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0]))", "```", "",
             "## Model", "", "| | |", "|---|---|"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings"):
        lines.append(f"| {key} | {config.get(key)} |")
    lines.append(f"| residual | {', '.join(f'{k}={v}' for k, v in sorted(residual.items()))} |")
    lines += ["", "## Training", ""]
    if source.step is not None:
        lines.append(f"Step {source.step:,}, {source.tokens_seen or 0:,} tokens seen.")
    if config_text:
        lines += ["", "<details><summary>Training config</summary>", "", "```yaml", config_text.rstrip(), "```",
                  "", "</details>"]
    lines += ["", "## Data", "", *data_section(config_text), "", "## Results", ""]
    shown = {k: v for k, v in metrics.items() if k.startswith(("val/", "final/")) or k == "train/loss"}
    if shown:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.4f} |" for k, v in sorted(shown.items()))]
    else:
        lines.append("No metrics were recorded with this model.")
    pictures = [p for p in paths if p.startswith("diagnostics/") and p.endswith(".png")]
    if pictures:
        lines += ["", "## Diagnostics", ""] + [f"![{Path(p).stem}]({p})" for p in pictures]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Push


def push(spec: str, repo: str, private: bool = False, revision: Optional[str] = None,
         commit_message: Optional[str] = None, option: str = "--repo", revision_option: str = "--revision") -> str:
    """Upload the model `spec` names to `repo` (on branch `revision`); return the commit URL.

    `option` and `revision_option` are how errors name the repository and the branch (train.py: hub.*)."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_repo_id(option, repo)
    check_revision(revision_option, revision)
    source = push_source(spec)
    check_push_access(repo, option)
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="mhc-push-") as scratch:
        files = upload_files(source, Path(scratch), repo)
        try:
            api.create_repo(repo, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo, branch=revision, exist_ok=True)
        except HfHubHTTPError as err:
            raise ConfigError(f"{option}={repo!r}: the Hub refused to create it or its branch {revision!r} "
                              f"({err}); allowed: a repository you can write to") from None
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                      for name, path in sorted(files.items())]
        message = commit_message or f"Upload {source.label}" + (f" (step {source.step})" if source.step else "")
        info = api.create_commit(repo, operations=operations, commit_message=message, revision=revision)
    return info.commit_url


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mhc_lm.hub", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("push", help="upload a run, a checkpoint or an export with a model card")
    cmd.add_argument("source", help="RUN, RUN/checkpoints/step_N or RUN/export")
    cmd.add_argument("--repo", required=True, help="USER/NAME or ORG/NAME")
    cmd.add_argument("--private", action="store_true", help="create the repository private")
    cmd.add_argument("--revision", default=None, help="a branch (created if needed), e.g. step-1000")
    cmd.add_argument("--message", default=None, help="the commit message")
    args = parser.parse_args(argv)
    try:
        url = push(args.source, args.repo, private=args.private, revision=args.revision, commit_message=args.message)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"pushed {args.source} to {args.repo}" + (f"@{args.revision}" if args.revision else "") + f": {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
