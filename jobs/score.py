"""`ray job submit --working-dir . -- python jobs/score.py INPUT --model BUNDLE --out OUT [flags]`.

Thin entrypoint over `ichd-ray score` (every flag of `ichd-ray score --help` applies). Under
`ray job submit` the driver runs on the cluster and joins it through RAY_ADDRESS.
"""

import sys

from ichd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
