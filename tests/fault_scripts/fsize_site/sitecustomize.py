"""Test-only: put Ray worker processes under a file size limit (a full disk, as the job sees it).

On ``PYTHONPATH`` of a Ray cluster started by ``tests/test_fault_disk.py`` (never of the code under
test). When ``$ICHD_TEST_FSIZE_LIMIT_FILE`` names a file holding a byte count, every Ray worker process
that starts while it exists gets ``RLIMIT_FSIZE`` = that count and ignores ``SIGXFSZ``, so a write past
it fails with ``EFBIG`` ("File too large") instead of killing the worker. Ray's daemons (GCS, raylet
with its object store, agents) are left alone: they need their own disk to start at all.
"""

import os

_flag = os.environ.get("ICHD_TEST_FSIZE_LIMIT_FILE")
if _flag:
    try:
        with open("/proc/self/cmdline", "rb") as _fh:
            _worker = b"default_worker.py" in _fh.read()
        if _worker:
            with open(_flag) as _fh:
                _limit = int(_fh.read().strip())
            import resource
            import signal

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (_limit, _limit))
    except (OSError, ValueError):  # no flag file: no limit
        pass
