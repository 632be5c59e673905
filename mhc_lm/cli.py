"""The command line of train.py and eval.py: every expected failure is one line on stderr and an exit code
from `mhc_lm.errors` (2 for bad input), before any work.

`run(hydra_main, config_name, check)` composes the config once with Hydra's compose API before handing
over to `@hydra.main`, so Hydra's own errors (an unknown group option, a typo in a key, a value of the
wrong type, an override it cannot parse) are caught and said in one line naming the option, the value
and what is allowed; then it checks the output directory (before Hydra creates it) and runs `check(cfg)`
(the script's validation). Inside the task, `reported()` turns an `MhcError` into its line and exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .errors import EXIT_BAD_INPUT, ConfigError, MhcError, check_writable_dir


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def report(err: MhcError) -> None:
    print(f"{err.prefix}: {one_line(str(err))}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def reported(output_dir: Optional[Path] = None) -> Iterator[None]:
    """Exit with the error's code and its one line on stderr when an `MhcError` escapes.

    `output_dir`: the run (or eval) directory Hydra made for this job. Bad input found inside the job
    (exit 2) removes it when it holds nothing but what Hydra put there, so a refused command leaves
    nothing behind; a directory with anything else (a checkpoint being resumed) is kept."""
    try:
        yield
    except MhcError as err:
        report(err)
        if output_dir is not None and err.exit_code == EXIT_BAD_INPUT:
            remove_if_only_hydra(Path(output_dir))
        sys.exit(err.exit_code)


HYDRA_LEFTOVERS = (".hydra",)  # with the job's log files (*.log), what Hydra writes before the task runs


def remove_if_only_hydra(path: Path) -> bool:
    """Delete `path` if it holds only Hydra's own files; True if it was deleted."""
    import shutil

    if not path.is_dir() or any(p.name not in HYDRA_LEFTOVERS and p.suffix != ".log" for p in path.iterdir()):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def run(hydra_main: Callable[[], Any], config_name: str, check: Optional[Callable[[Any], None]] = None,
        output_option: str = "trainer.output_dir") -> None:
    """Check sys.argv's overrides (`check_command_line`), then call `hydra_main`.

    Command lines with Hydra flags (--help, --cfg, -m, ...) go to Hydra unchecked."""
    overrides = sys.argv[1:]
    if not any(arg.startswith("-") for arg in overrides):
        with reported():
            check_command_line(config_name, overrides, check, output_option)
    hydra_main()


def check_command_line(config_name: str, overrides: list[str], check: Optional[Callable[[Any], None]] = None,
                       output_option: str = "trainer.output_dir"):
    """Composition, the output directory (before Hydra creates it) and `check(cfg)`; returns (cfg, run_dir).
    Raises the MhcError `run` reports."""
    cfg, run_dir = compose_checked(config_name, overrides)
    explicit_dir = any(o.split("=", 1)[0].lstrip("+~") == "hydra.run.dir" for o in overrides)
    check_output_dir(run_dir, "hydra.run.dir" if explicit_dir else output_option)
    if check is not None:
        check(cfg)
    return cfg, run_dir


# ---------------------------------------------------------------------------------------------
# Composition errors, said in one line


def compose_checked(config_name: str, overrides: list[str]):
    """(the typed config, the run directory Hydra will create) of these overrides; ConfigError for
    whatever Hydra or OmegaConf would refuse."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from .config import CONF_DIR, register_configs

    register_configs()
    check_override_syntax(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            composed = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
            run_dir = Path(str(composed.hydra.run.dir))
            node = composed.copy()
            with open_dict(node):
                node.pop("hydra")  # the run's own config, as @hydra.main passes it
            check_no_added_keys(node)
            cfg = OmegaConf.to_object(node)
    except (HydraException, OmegaConfBaseException) as err:
        raise composition_error(err, config_name, overrides) from None
    return cfg, run_dir


def check_override_syntax(overrides: list[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except HydraException as err:
            lines = [ln for ln in str(err).split("\n") if ln and not ln.startswith(("See https", "Error parsing"))]
            why = one_line(lines[-1] if lines else str(err))
            raise ConfigError(f"{override!r}: not an override ({why}); allowed: key=value, group=option, "
                              "+key=value (add), ~key (delete)") from None


def composition_error(err: Exception, config_name: str, overrides: list[str]) -> ConfigError:
    from hydra.errors import MissingConfigException
    from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException,
                                  ValidationError)

    if isinstance(err, MissingConfigException):
        return missing_group_option(err, overrides)
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    full_key = getattr(cause, "full_key", None) or ""
    given = override_value(overrides, full_key)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and full_key:
        return unknown_key(full_key, given, config_name, overrides)
    if isinstance(cause, ValidationError) and full_key:
        expected = expected_type(getattr(cause, "object_type", None), full_key.rsplit(".", 1)[-1])
        if full_key.endswith("]"):  # an element of a list option: optim.betas[0]
            full_key = full_key[:full_key.rindex("[")]
            given = override_value(overrides, full_key)
        return ConfigError(f"{full_key}={given if given is not None else cause.value!r}: not {expected}; "
                           f"allowed: {expected}")
    if isinstance(cause, MissingMandatoryValue) and full_key:
        return ConfigError(f"{full_key}=???: has no value; allowed: set it on the command line ({full_key}=...)")
    first = one_line(str(cause).split("\n")[0])
    return ConfigError(f"{full_key or 'overrides'}={given if given is not None else ' '.join(overrides)!s}: {first}; "
                       "allowed: a value of the option's type, or an interpolation of an existing key")


def override_value(overrides: list[str], full_key: str) -> Optional[str]:
    """The value an override gave `full_key` as typed, None if no override names it."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == full_key:
            return value
    return None


def missing_group_option(err, overrides: list[str]) -> ConfigError:
    missing = err.missing_cfg_file or ""
    group, _, option = missing.rpartition("/")
    options = list(err.options or [])
    if not group:
        return ConfigError(f"config {missing!r}: no such config; allowed: {', '.join(options) or 'config, eval'}")
    return ConfigError(f"{group}={option}: no such {group} config; allowed: {', '.join(sorted(options))}")


def unknown_key(full_key: str, given: Optional[str], config_name: str, overrides: list[str]) -> ConfigError:
    """`section.key=value: no such option`, with the nearest existing key of that section."""
    parent, _, key = full_key.rpartition(".")
    composed = clean_compose(config_name, overrides)
    siblings = section_keys(composed, parent)
    near = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    where = f"in {parent}" if parent else "at the top level"
    if parent == "residual" and composed is not None:
        where = f"of residual={composed.residual.name}"
    hint = f"did you mean {parent + '.' if parent else ''}{near[0]}? " if near else ""
    allowed = ", ".join(siblings)
    return ConfigError(f"{full_key}={given}: no such option {where}; {hint}allowed: {allowed}")


def clean_compose(config_name: str, overrides: list[str]):
    """The config composed from the group choices among the overrides alone (residual=hc lists hc's
    options); None if a choice itself is bad (that error is said elsewhere)."""
    from hydra import compose, initialize_config_dir

    from .config import CONF_DIR

    kept = [o for o in overrides if "." not in o.split("=", 1)[0] and not o.startswith(("+", "~"))]
    for attempt in (kept, []):
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
                return compose(config_name=config_name, overrides=attempt)
        except Exception:  # noqa: BLE001
            continue
    return None


def section_keys(composed, section: str) -> list[str]:
    from omegaconf import OmegaConf

    if composed is None:
        return []
    node = OmegaConf.select(composed, section) if section else composed
    return sorted(str(k) for k in node.keys()) if OmegaConf.is_dict(node) else []


def check_no_added_keys(node) -> None:
    """`+key=value` may add keys Hydra accepts but no dataclass field holds: a silently ignored option.
    Only `residual` takes new keys (its variant checks them)."""
    import dataclasses as dc

    from omegaconf import OmegaConf

    schema = OmegaConf.get_type(node)
    if not dc.is_dataclass(schema):
        return
    for key in node.keys():
        fields = {f.name: f for f in dc.fields(schema)}
        if key not in fields:
            raise ConfigError(f"{key}={OmegaConf.to_container(node, resolve=False).get(key)!r}: no such option at "
                              f"the top level; allowed: {', '.join(sorted(fields))}")
        child = node._get_node(key)
        if OmegaConf.is_dict(child) and dc.is_dataclass(OmegaConf.get_type(child)):
            allowed = {f.name for f in dc.fields(OmegaConf.get_type(child))}
            for sub in child.keys():
                if sub not in allowed:
                    raise ConfigError(f"{key}.{sub}={child._get_node(sub)._value()!r}: no such option in {key}; "
                                      f"allowed: {', '.join(sorted(allowed))}")


def expected_type(dataclass_type, key: str) -> str:
    """`an integer`, `a number`, `true or false`, ... for field `key` of a config dataclass."""
    hint = None
    element = key.endswith("]")
    key = key.split("[", 1)[0]
    if dataclasses.is_dataclass(dataclass_type):
        with contextlib.suppress(Exception):
            hint = typing.get_type_hints(dataclass_type).get(key)
    if element and typing.get_origin(hint) in (list, tuple):
        return "a list of " + expected_type_words(typing.get_args(hint)[0]).split(" ", 1)[1] + "s"
    return expected_type_words(hint)


def expected_type_words(hint) -> str:
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if optional:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint)
    if words is None:
        origin = typing.get_origin(hint)
        words = "a list such as [a,b]" if origin in (list, tuple) else "a value of the option's type"
    return words + (", or null" if optional else "")


# ---------------------------------------------------------------------------------------------
# The output directory


def check_output_dir(path: Path, option: str) -> None:
    """The run directory must be creatable and writable: its nearest existing ancestor is a writable directory."""
    check_writable_dir(option, path)
