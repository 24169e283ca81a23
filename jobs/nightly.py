"""`ray job submit --working-dir . -- python jobs/nightly.py --archive URI --model BUNDLE --out OUT [flags]`.

Thin entrypoint over `ichd-ray nightly` (every flag of `ichd-ray nightly --help` applies). Exit codes:
0 succeeded, 1 committed as failed (see the printed problems), 2 bad arguments or config, 75 another run
holds OUT's lease (try again later; the next night's run picks the work up).
"""

import sys

from ichd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
