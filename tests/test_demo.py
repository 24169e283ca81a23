from ichd_ray.demo import DemoConfig, run_demo


def test_demo_windows_every_good_slice_and_reports_bad_ones(tmp_path, capsys):
    cfg = DemoConfig(out=str(tmp_path / "demo"), studies=3, slices=5, dicom_size=64, input_size=32, workers=1)
    result = run_demo(cfg)
    assert result["windowed"] == result["synth"]["slices"]
    assert result["rejected"] == {"empty": 1, "truncated": 1, "not_dicom": 1}
    assert result["max_reference_diff"] <= 1
    errors = (tmp_path / "demo" / "errors.csv").read_text().splitlines()
    assert errors[0] == "uri,reason,message" and len(errors) == 4
    out = capsys.readouterr().out
    assert "windowed   " in out and "bad-empty-0.dcm" in out
