"""CLI behaviour that is not a job's: storage failures end in one clear line and exit 3; config validate."""

import json

from ichd_ray.cli import EXIT_STORAGE, main


def test_a_storage_failure_is_one_line_naming_the_path_not_a_traceback(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["model", "init", "--backbone", "test_resnet", "--input-size", "32", str(blocker / "bundle")])
    err = capsys.readouterr().err
    assert code == EXIT_STORAGE == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("ichd-ray model: storage failed: Not a directory") and str(blocker) in lines[0]


def test_config_validate_names_each_bad_field_and_prints_the_resolved_config(tmp_path, capsys):
    from ichd_ray.cli import main

    bad = tmp_path / "train.yaml"
    bad.write_text("cnn:\n  epochs: 0\n  augment: {rotate_deg: 500}\n")
    assert main(["config", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "cnn.epochs: expected an integer >= 1, got 0" in err
    assert "cnn.augment.rotate_deg: expected a number <= 180.0, got 500" in err
    good = tmp_path / "job.yaml"
    good.write_text("score:\n  num_actors: 2\n")
    assert main(["config", "validate", str(good)]) == 0
    out = capsys.readouterr().out
    resolved = json.loads(out.split("\n", 1)[1])
    assert resolved["score"]["num_actors"] == 2 and resolved["index"]["header_bytes"] == 65536
    assert main(["config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["JobConfig"]["$defs"]["ScoreConfig"]["properties"]["num_actors"]["minimum"] == 1
