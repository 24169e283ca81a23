import pytest
import yaml

from ichd_ray.demo import DemoConfig, run_demo

pytestmark = pytest.mark.timeout(600)

# The demo recipe's story at toy size: every stage runs, in about a minute on 2 CPUs.
TOY = {
    "data": {"folds": 2, "input_size": 32, "studies_per_task": 4},
    "cnn": {"backbone": "test_resnet", "epochs": 1, "samples_per_study": 4, "batch_size": 8, "torch_threads": 1},
    "sequence": {"epochs": 1, "batch_size": 4, "window": 6, "proj_dims": [16, 8], "hidden": 8},
}


def test_demo_trains_scores_and_evaluates(ray_session, tmp_path, capsys):
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(TOY))
    cfg = DemoConfig(out=str(tmp_path / "demo"), studies=6, slices=6, dicom_size=64, config=str(config), workers=1)
    summary = run_demo(cfg)
    assert summary.status == "succeeded" and summary.n_studies == 6
    # the truncated copy repeats a SOP UID; the archive's three CSVs are skipped by suffix
    assert summary.reasons == {"empty": 1, "not_dicom": 1, "duplicate": 1, "excluded": 3}
    assert summary.outcomes == {"fault": 2, "selection": 1, "skip": 3}
    assert summary.n_inputs == summary.n_slices_scored + summary.n_rejected
    out = capsys.readouterr().out
    for text in ("[2/4] training", "prior-only baseline", "CNN + sequence", "run demo", "[4/4] evaluating", "ichd-ray results"):
        assert text in out
    assert (tmp_path / "demo" / "results" / "evaluation" / "demo.json").exists()
