"""CLI behaviour that is not a job's: storage failures end in one clear line and exit 3."""

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
