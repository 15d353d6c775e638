"""Experiment files load as `--config=FILE:ARG` would, and refuse presets they do not know."""
import pathlib

import pytest

from acis_jax.config_utils import load_config_file, parse_presets

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def test_presets_split_on_commas():
  assert parse_presets(None, ("a", "b")) == set()
  assert parse_presets("b,a", ("a", "b")) == {"a", "b"}
  with pytest.raises(ValueError, match=r"unknown presets \['c'\]"):
    parse_presets("a,c", ("a", "b"))


@pytest.mark.parametrize("name", ["demo", "fewshot_ct2d", "smoke"])
def test_experiments_refuse_unknown_presets(name):
  with pytest.raises(ValueError, match="unknown presets"):
    load_config_file(str(EXPERIMENTS / f"{name}.py"), "no-such-preset")


def test_a_preset_changes_the_config():
  assert load_config_file(str(EXPERIMENTS / "demo.py")).mode == "train,synthesize"
  assert load_config_file(str(EXPERIMENTS / "demo.py"), "pseudomask,2d").mode == "pseudomask"


def test_a_missing_file_is_named():
  with pytest.raises(FileNotFoundError, match="nothing_here.py"):
    load_config_file(str(EXPERIMENTS / "nothing_here.py"))
