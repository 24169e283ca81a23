"""ichd_ray.config.recipes: the shipped recipe files, by name; `ichd-ray recipes` (list, print, cp)."""

import hashlib
import json
import subprocess
import sys

import pytest
import yaml

from ichd_ray.cli import main
from ichd_ray.config.job import ConfigError
from ichd_ray.config.recipes import RECIPE_ALIASES, load_recipe, recipe_names
from ichd_ray.config.train import TrainConfig
from ichd_ray.io.config_files import load_train_config


def test_the_shipped_recipes_are_the_files_in_the_package():
    assert recipe_names() == ["demo", "rsna1st"]
    assert RECIPE_ALIASES == {"rsna": "rsna1st"}
    for name in recipe_names():
        recipe = load_recipe(name)
        assert recipe.description and recipe.name == name
        assert recipe.sha256 == hashlib.sha256(recipe.text.encode()).hexdigest()
        assert set(recipe.sections()) <= set(TrainConfig.model_fields)


@pytest.mark.parametrize("name", recipe_names())
def test_each_recipe_validates_and_hashes_stably(name):
    cfg = load_train_config(name)
    assert cfg.data.folds >= 2 and cfg.cnn.epochs >= 1
    # the hash is the hash of the resolved config's sorted JSON: stable across loads, moved by any field
    assert cfg.sha256() == hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()
    assert load_train_config(name).sha256() == cfg.sha256()
    assert load_train_config(name, overrides={"cnn": {"lr": cfg.cnn.lr * 2}}).sha256() != cfg.sha256()


# What the presets resolved to before they became files (sha256 of the resolved config at b74f2c4):
# moving them must not move a single value (the training keys of existing bundles depend on them).
PRESET_SHA256 = {
    "demo": "47fff1502e492c301af0fe7740a8e9fbba397b2d675fd6cfa4360c564bd54b6b",
    "rsna1st": "4c18571c24dbbc0ffe45ac6d6fbb6d00a3ea2a3ce87910b1baf7adbc8e575500",
}


# Fields added since b74f2c4, each with a default: left out of the comparison above, so any value the
# presets had is still checked, and a new field cannot slip in unlisted.
ADDED_SINCE_PRESETS = {("index", "table_memory_gb")}


def _as_presets_resolved(cfg) -> str:
    resolved = cfg.to_dict()
    for section, name in ADDED_SINCE_PRESETS:
        del resolved[section][name]
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()


def test_the_recipes_resolve_to_what_the_presets_did():
    assert {name: _as_presets_resolved(load_train_config(name)) for name in recipe_names()} == PRESET_SHA256
    demo, rsna = load_train_config("demo"), load_train_config("rsna")
    assert (demo.cnn.backbone, demo.data.input_size, demo.data.folds, demo.cnn.epochs, demo.cnn.lr) == ("test_resnet", 128, 3, 5, 3e-3)
    assert (demo.sequence.epochs, demo.sequence.proj_dims, demo.sequence.hidden, demo.score.studies_per_batch) == (30, (96, 64), 64, 4)
    assert (rsna.cnn.backbone, rsna.data.input_size, rsna.data.folds, rsna.cnn.use_gpu) == ("densenet121", 512, 5, True)
    assert (rsna.sequence.rnn, rsna.sequence.window, rsna.score.device, rsna.ray.address) == ("gru", 24, "cuda", "auto")
    assert load_train_config("rsna1st") == rsna


def test_an_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"recipe: expected one of \['demo', 'rsna1st'\] \(aliases: rsna = rsna1st\), got 'huge'"):
        load_recipe("huge")


def test_recipes_lists_one_line_each(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == recipe_names()
    assert "(alias: rsna)" in lines[1] and load_recipe("demo").description in lines[0]


def test_recipes_name_prints_the_resolved_config(capsys):
    assert main(["recipes", "rsna"]) == 0
    text = capsys.readouterr().out
    assert f"sha256 {load_recipe('rsna1st').sha256}" in text
    assert TrainConfig.model_validate(yaml.safe_load(text)) == load_train_config("rsna1st")


def test_a_copied_recipe_alone_is_the_whole_config_whatever_it_overlays(tmp_path, capsys):
    """`recipes cp` writes every field, so `--config copy.yaml` over the default demo recipe is still rsna1st
    (a verbatim copy of the partial file would silently pick up demo's values where rsna1st names none)."""
    copy = tmp_path / "mine.yaml"
    assert main(["recipes", "cp", "rsna1st", str(copy)]) == 0
    for base in recipe_names():
        assert load_train_config(base, str(copy)) == load_train_config("rsna1st")
    # and it is a file to edit: a changed field is that field only
    copy.write_text(copy.read_text().replace("epochs: 10", "epochs: 2", 1))
    edited = load_train_config("demo", str(copy))
    assert edited.cnn.epochs == 2 and edited.model_copy(update={"cnn": edited.cnn.model_copy(update={"epochs": 10})}) == load_train_config("rsna1st")
    capsys.readouterr()
    assert main(["recipes", "cp", "demo", str(copy)]) == 2  # never replaces a file
    assert "exists" in capsys.readouterr().err and "epochs: 2" in copy.read_text()
    assert main(["config", "validate", str(copy)]) == 0


def test_preset_is_a_deprecated_alias_of_recipe(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("cnn:\n  epochs: 0\n")
    assert main(["config", "validate", str(cfg), "--preset", "rsna"]) == 2
    err = capsys.readouterr().err
    assert "--preset is deprecated; use --recipe" in err and "cnn.epochs" in err
    assert main(["config", "validate", str(cfg), "--recipe", "demo", "--preset", "rsna"]) == 2
    assert "disagree" in capsys.readouterr().err


def test_usage_errors(capsys):
    assert main(["recipes", "cp", "demo"]) == 2
    assert "usage: ichd-ray recipes [NAME | cp NAME FILE]" in capsys.readouterr().err
    assert main(["recipes", "nope"]) == 2
    assert "expected one of" in capsys.readouterr().err


def test_a_closed_pipe_is_not_a_storage_failure():
    """`ichd-ray config --schema | head -1`: the reader leaves before the output is written; the command
    stops quietly instead of reporting 'storage failed: Broken pipe'."""
    proc = subprocess.Popen([sys.executable, "-m", "ichd_ray.cli", "config", "--schema"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the interpreter has even started: every write meets EPIPE
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "storage failed" not in err and "Traceback" not in err, err
