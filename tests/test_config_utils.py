"""Experiment files load as `--config=FILE:ARG` would, and refuse presets they do not know."""
import ast
import pathlib
import re

from absl import flags
from ml_collections import config_flags
import pytest

from acis_jax.config_utils import load_config_file, parse_presets
from acis_jax.data.sources import load_examples
from acis_jax.defaults import check_config, resolve_config

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def test_presets_split_on_commas():
  assert parse_presets(None, ("a", "b")) == set()
  assert parse_presets("b,a", ("a", "b")) == {"a", "b"}
  with pytest.raises(ValueError, match=r"unknown presets \['c'\]"):
    parse_presets("a,c", ("a", "b"))


@pytest.mark.parametrize("name", ["demo", "fewshot_chest2d", "fewshot_ct2d", "smoke", "tlobes"])
def test_experiments_refuse_unknown_presets(name):
  with pytest.raises(ValueError, match="unknown presets"):
    load_config_file(str(EXPERIMENTS / f"{name}.py"), "no-such-preset")


def test_a_preset_changes_the_config():
  assert load_config_file(str(EXPERIMENTS / "demo.py")).mode == "train,synthesize"
  assert load_config_file(str(EXPERIMENTS / "demo.py"), "pseudomask,2d").mode == "pseudomask"


def test_a_missing_file_is_named():
  with pytest.raises(FileNotFoundError, match="nothing_here.py"):
    load_config_file(str(EXPERIMENTS / "nothing_here.py"))


def parsed_config(argv: list[str]):
  """The config that `python -m acis_jax.main` would get from `argv`, through absl's parser."""
  argv = ["main", *argv]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                           lock_config=True, sys_argv=argv)
  flag_values(argv)
  return holder.value


def test_command_line_data_dir_keeps_the_configs_class_count(tmp_path):
  tlobes = str(EXPERIMENTS / "tlobes.py")
  config = parsed_config([f"--config={tlobes}", f"--config.data.data_dir={tmp_path}"])
  assert (config.data.data_dir, config.data.num_classes) == (str(tmp_path), 7)
  config = parsed_config([f"--config={tlobes}:cpu"])
  assert (config.data.sample, config.data.num_classes) == ("lobes", 7)


def test_no_data_is_refused_before_any_work():
  config = load_config_file(str(EXPERIMENTS / "tlobes.py"))
  config.data.sample = ""
  with pytest.raises(ValueError, match="data_dir and data.sample are both empty"):
    load_examples(config.data)


def config_fields_read(tree: ast.AST) -> list[str]:
  """The `config.…` attributes that an if statement or expression of `tree` tests."""
  read = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.If, ast.IfExp)):
      attributes = [a for a in ast.walk(node.test) if isinstance(a, ast.Attribute)]
      inner = {id(a.value) for a in attributes}  # `config.data` inside `config.data.data_dir`
      read += [ast.unparse(a) for a in attributes
               if id(a) not in inner and ast.unparse(a).startswith("config.")]
  return read


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.py")), ids=lambda p: p.stem)
def test_experiments_branch_only_on_their_presets(path):
  """A branch on a field would be decided before the command line sets it."""
  assert config_fields_read(ast.parse(path.read_text())) == []


def test_the_branch_finder_sees_a_branch_on_a_field():
  source = "def get_config(arg):\n  if not config.data.data_dir:\n    config.x = 1\n"
  assert config_fields_read(ast.parse(source)) == ["config.data.data_dir"]


@pytest.mark.parametrize("field, value", [
    ("train.batch_size", 0), ("train.checkpoint_every", 0), ("train.log_every", 0),
    ("data.max_cases", -1), ("data.num_classes", -1), ("data.num_classes", 1),
    ("refine.passes", 1), ("data.image_shape", (32, 0)), ("synthesize.source", "noise"),
    ("synthesize.deformation", -1.0), ("synthesize.deformation_scale", 0.0),
    ("train.annotation_finetune_steps", -1), ("refine.mode", "reinforce"),
    ("refine.actions", 0), ("refine.noise_factor", 0)])
def test_impossible_values_are_refused_naming_the_field(field, value):
  config = load_config_file(str(EXPERIMENTS / "smoke.py"))
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}")):
    check_config(config)


def test_label_maps_as_the_source_need_a_folder_and_labels():
  config = load_config_file(str(EXPERIMENTS / "smoke.py"))
  config.synthesize.source = "labels"
  with pytest.raises(ValueError, match="needs synthesize.labels_dir"):
    check_config(config)
  config.synthesize.labels_dir = "/somewhere"
  config.data.num_classes = 0
  with pytest.raises(ValueError, match="needs a labelled run"):
    check_config(config)


def test_every_experiment_passes_the_check():
  for path in sorted(EXPERIMENTS.glob("*.py")):
    check_config(load_config_file(str(path)))


def test_classes_given_as_one_comma_joined_string_are_split_and_set_the_class_count():
  """`--config.data.classes=left_lung,right_lung` reaches the config as one string in a
  tuple (ml_collections' flag parsing)."""
  config = load_config_file(str(EXPERIMENTS / "fewshot_chest2d.py"))
  assert config.data.num_classes == 4
  config.data.classes = ("left_lung,right_lung",)
  resolve_config(config)
  assert config.data.classes == ("left_lung", "right_lung") and config.data.num_classes == 3
  config.data.classes = ()
  resolve_config(config)  # no names: the count stays as given
  assert config.data.num_classes == 3
