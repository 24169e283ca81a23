"""`ray job submit --working-dir . -- python jobs/train.py all --data DATA --labels labels.csv --out BUNDLE [flags]`.

Thin entrypoint over `ichd-ray train` (`all`, `cnn` or `sequence`; every flag of `ichd-ray train STAGE
--help` applies). Under `ray job submit` the driver runs on the cluster and joins it through
RAY_ADDRESS; re-submitting the same command after a failure resumes from the work folder.
"""

import sys

from ichd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
