"""What users call keeps working across refactors: public import paths, job entry points, frozen bundles.

``tests/data/frozen_bundle_v0`` was written by the code of commit 401253d (before the package
reorganisation of issue 10): a 1-fold ``test_resnet`` bundle at 32 px (``ichd-ray model init ... --seed
5``), a 25-object synthetic archive (``ichd-ray synth --studies 3 --slices 8 --size 64 --seed 7``) and the
probabilities that code committed for it. Today's code must load that bundle and score that archive to
the same probabilities.
"""

from __future__ import annotations

import glob
import pathlib
import shutil

import numpy as np
import pandas as pd
import pytest

from ichd_ray import CLASSES

FROZEN = pathlib.Path(__file__).parent / "data" / "frozen_bundle_v0"
P_COLUMNS = [f"p_{c}" for c in CLASSES]


@pytest.mark.timeout(240)
def test_a_bundle_written_before_the_refactor_scores_the_same(ray_session, tmp_path):
    from ichd_ray.cli import main

    bundle = tmp_path / "bundle"
    shutil.copytree(FROZEN / "bundle", bundle)
    out = tmp_path / "out"
    rc = main(["score", str(FROZEN / "archive"), "--model", str(bundle), "--out", str(out), "--run-id", "frozen",
               "--no-progress"])
    assert rc in (0, None)
    for table, key in (("slices", "sop_uid"), ("studies", "study_uid")):
        got = pd.concat(pd.read_parquet(f) for f in glob.glob(str(out / table / "run_id=frozen" / "*" / "*.parquet")))
        got = got[[key] + P_COLUMNS].sort_values(key).reset_index(drop=True)
        want = pd.read_csv(FROZEN / f"{table}.csv").sort_values(key).reset_index(drop=True)
        assert list(got[key]) == list(want[key]), table
        np.testing.assert_allclose(got[P_COLUMNS].to_numpy(), want[P_COLUMNS].to_numpy(), atol=1e-6, rtol=0)


def test_public_import_paths():
    """Names README, infra and analysts' notebooks use."""
    from ichd_ray.report import query  # noqa: F401  (README: "Result tables")
    from ichd_ray.cli import main  # noqa: F401  (the ichd-ray entry point, jobs/*.py)
