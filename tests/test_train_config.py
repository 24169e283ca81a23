"""ichd_ray.config.train: the training config resolved from a recipe, a YAML file and overrides; errors name the field."""

import pytest

from ichd_ray.config.job import ConfigError
from ichd_ray.config.recipes import load_recipe
from ichd_ray.io.config_files import load_train_config
from ichd_ray.training.augment import AugmentConfig


def test_yaml_overrides_and_errors_name_the_field(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("cnn:\n  epochs: 7\n  augment: {hflip_p: 0.0}\nsequence:\n  proj_dims: [64, 32]\n")
    cfg = load_train_config("demo", str(path), {"data": {"folds": 4}})
    assert (cfg.cnn.epochs, cfg.data.folds, cfg.sequence.proj_dims) == (7, 4, (64, 32))
    assert cfg.cnn.augment == AugmentConfig(hflip_p=0.0)  # resolved: the rest are the defaults
    assert cfg.cnn.backbone == load_recipe("demo").sections()["cnn"]["backbone"]  # the rest of the recipe stays
    for text, field in [
        ("cnn:\n  epochs: 0\n", "cnn.epochs"),
        ("cnn:\n  backbone: not_a_net\n", "cnn.backbone"),
        ("cnn:\n  augment: {rotate_deg: 500}\n", "cnn.augment"),
        ("data:\n  folds: 1\n", "data.folds"),
        ("sequence:\n  rnn: transformer\n", "sequence"),
        ("cnn:\n  epoch: 3\n", "unknown field"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_train_config("demo", str(path))
    with pytest.raises(ConfigError, match="recipe: expected one of"):
        load_train_config("huge")
