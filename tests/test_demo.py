import pytest

from ichd_ray.demo import DemoConfig, run_demo

pytestmark = pytest.mark.timeout(300)


def test_demo_scores_every_good_slice_and_reports_bad_ones(ray_session, tmp_path, capsys):
    cfg = DemoConfig(out=str(tmp_path / "demo"), studies=3, slices=5, dicom_size=64, input_size=32,
                     backbone="test_resnet", workers=1)
    summary = run_demo(cfg)
    assert summary.status == "succeeded" and summary.n_studies == 3
    assert summary.reasons == {"empty": 1, "not_dicom": 1, "duplicate": 1}  # the truncated copy repeats a SOP UID
    assert summary.n_inputs == summary.n_slices_scored + summary.n_rejected
    out = capsys.readouterr().out
    assert "run demo" in out and "ichd-ray results" in out
