"""`ray job submit ... -- python jobs/synth.py OUT [flags]`: write a synthetic study set to storage.

A thin entrypoint over `ichd-ray synth` so a cluster can fill an S3 prefix for load tests; every flag
of `ichd-ray synth --help` applies. Runs on the job's driver (no Ray tasks needed for this step).
"""

import sys

from ichd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["synth", *sys.argv[1:]]))
