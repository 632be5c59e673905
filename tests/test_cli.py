"""Bad command lines end in one line naming the option, the value and what is allowed (mhc_lm.cli)."""

from __future__ import annotations

import pytest

from mhc_lm.cli import check_output_dir, compose_checked
from mhc_lm.errors import ConfigError


@pytest.mark.parametrize("config,overrides,expected", [
    ("config", ["trainer.max_steps=abc"], "trainer.max_steps='abc': not an integer"),
    ("config", ["trainer.max_steps=1.5"], "trainer.max_steps='1.5': not an integer"),
    ("config", ["trainer.maxsteps=10"], "did you mean trainer.max_steps?"),
    ("config", ["residual.sinkhorn_iter=5"], "no such option of residual=mhc; did you mean residual.sinkhorn_iters?"),
    ("config", ["residual=hc", "residual.sinkhorn_iters=5"], "residual.sinkhorn_iters=5: no such option of residual=hc"),
    ("config", ["residual=foo"], "residual=foo: no such residual config; allowed: hc, ihc"),
    ("config", ["model=huge"], "model=huge: no such model config; allowed: base, medium, small, tiny"),
    ("config", ["trainer.compile=maybe"], "trainer.compile='maybe': not true or false"),
    ("config", ["optim.betas=[a,b]"], "optim.betas='[a,b]': not a value of the option's type"),
    ("config", ["+foo=1"], "foo=1: no such option at the top level"),
    ("config", ["+trainer.foo=1"], "trainer.foo=1: no such option in trainer"),
    ("config", ["trainer.max_steps"], "'trainer.max_steps': not an override"),
    ("config", ["data.files=[a"], "'data.files=[a': not an override"),
    ("config", ["trainer.num_threads=x"], "trainer.num_threads='x': not an integer, or null"),
    ("eval", [], "models=???: has no value"),
    ("eval", ["models=[a]", "lm_eval.limit=x"], "lm_eval.limit='x': not a number, or null"),
])
def test_hydra_errors_are_one_line_naming_option_value_and_allowed(config, overrides, expected):
    with pytest.raises(ConfigError) as err:
        compose_checked(config, overrides)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_a_good_command_line_composes_to_the_typed_config(tmp_path):
    cfg, run_dir = compose_checked("config", ["model=tiny", f"hydra.run.dir={tmp_path / 'run'}"])
    assert cfg.model.d_model == 64 and run_dir == tmp_path / "run"


def test_an_output_path_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "file" / "runs" / "a", "trainer.output_dir")
    check_output_dir(tmp_path / "new" / "dir", "trainer.output_dir")  # creatable: fine


def test_resuming_another_residual_variant_names_residual_name(tmp_path):
    import json

    from mhc_lm.checkpoint import check_compatible

    (tmp_path / "run_config.json").write_text(json.dumps({"model": {}, "residual": {"name": "mhc", "n": 4,
                                                                                      "collapse": "head"}}))
    with pytest.raises(ConfigError, match=r"residual.name='hc': .* trained with residual=mhc"):
        check_compatible(tmp_path, {"model": {}, "residual": {"name": "hc", "n": 4, "collapse": "mean"}})
