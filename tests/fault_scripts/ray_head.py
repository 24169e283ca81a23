"""A one-node Ray cluster for a test to point a CLI at (``RAY_ADDRESS``), running until stdin closes.

    python tests/fault_scripts/ray_head.py TEMP_DIR NUM_CPUS ADDRESS_FILE

Started as a subprocess (with its own temp dir, so nothing is shared with other Ray clusters on the
machine); writes the GCS address to ADDRESS_FILE once the node is up and shuts the node down when its
stdin reaches EOF (the test closes it, or dies).
"""

import os
import sys

os.environ.setdefault("ICHD_PATIENT_SALT", "test-salt")


def main() -> int:
    from ray.cluster_utils import Cluster

    temp_dir, cpus, address_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus, "temp_dir": temp_dir, "include_dashboard": False, "object_store_memory": 100 * 1024 * 1024,
    })
    tmp = address_file + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(cluster.address)
    os.replace(tmp, address_file)
    try:
        sys.stdin.read()  # until the test closes our stdin
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
