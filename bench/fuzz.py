"""The DICOM reader fuzz at bench size: thousands of mutated slices, outcome counts per reason.

Same seeds, mutations and oracle as ``tests/test_read_fuzz.py`` (imported from there), but random
(not derandomized) and many more examples. Every example must end as exact HU or a typed rejection,
under the tracemalloc bound; a failure stops the run with hypothesis's minimal example. A watchdog
thread dumps every stack and exits 124 when one example runs longer than ``--hang-s`` (a hang, not
a slow example: nothing is asserted about time).

    python bench/fuzz.py [--examples 4000] [--compressed-share 0.3] [--seed N] [--hang-s 120]

Prints markdown tables (outcomes by reason; outcomes by mutation kind) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import os
import random
import sys
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("ICHD_PATIENT_SALT", "bench")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402

import test_read_fuzz as fuzz  # noqa: E402  (tests/ is on sys.path above)
from ichd_ray.dicom.read import REJECT_REASONS, load_slice  # noqa: E402

KINDS = ("delete", "garbage", "tricky", "length", "vr", "dims", "ushort", "pixels", "truncate")


class Watchdog:
    """Exit 124 with every thread's stack and the running example when one example exceeds ``limit``."""

    def __init__(self, limit: float) -> None:
        self.limit, self.timer, self.case = limit, None, None

    def _fire(self) -> None:
        print(f"\nHANG: example ran over {self.limit:.0f} s: {self.case!r}", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(124)

    def __enter__(self):
        self.timer = threading.Timer(self.limit, self._fire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()


def kinds_of(case: fuzz.Case) -> set[str]:
    return {edit.split()[0] for edit in case.edits.split("; ")}


def run(names: tuple[str, ...], examples: int, seed: int, hang_s: float, tally: dict) -> None:
    watchdog = Watchdog(hang_s)
    seed_hu = {n: load_slice(fuzz.seed(n).data).hu for n in names}

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(fuzz.mutated(names))
    def one(case: fuzz.Case) -> None:
        watchdog.case = case
        with watchdog:
            outcome = fuzz.check(case.data, case.seed.size)
        if outcome == "accepted":  # accepted with the seed's HU, or with the mutated payload's
            same = np.array_equal(load_slice(case.data).hu, seed_hu[case.seed.name])
            outcome = "accepted" if same else "accepted (HU changed)"
        tally["outcome"][outcome] += 1
        tally["seed"][(case.seed.name, outcome)] += 1
        for kind in kinds_of(case):
            tally["kind"][(kind, outcome)] += 1
        tally["n"] += 1

    one()


def table(rows: list[list[str]], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--compressed-share", type=float, default=0.3, help="share of examples on compressed seeds")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random, printed)")
    parser.add_argument("--hang-s", type=float, default=120.0, help="watchdog: one example longer than this is a hang")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    n_compressed = int(round(args.examples * args.compressed_share))
    tally = {"outcome": collections.Counter(), "seed": collections.Counter(), "kind": collections.Counter(), "n": 0}
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(fuzz.NATIVE_SEEDS, args.examples - n_compressed, seed, args.hang_s, tally)
        run(fuzz.COMPRESSED_SEEDS, n_compressed, seed + 1, args.hang_s, tally)
    seconds = time.perf_counter() - started

    n = tally["n"]
    order = ["accepted", "accepted (HU changed)", *[r for r in REJECT_REASONS if r not in ("duplicate", "other_series")]]
    print(f"DICOM fuzz: {n} examples ({args.examples - n_compressed} on native seeds, {n_compressed} on compressed), "
          f"hypothesis seed {seed}, {seconds:.0f} s ({n / seconds:.0f} examples/s), 0 failures, "
          f"traced peak bound {fuzz.PEAK_BOUND >> 20} MiB\n")
    rows = [[o, str(tally["outcome"][o]), f"{100 * tally['outcome'][o] / n:.1f}%"] for o in order if tally["outcome"][o]]
    print(table(rows, ["outcome", "examples", "share"]))
    print()
    used = [o for o in order if tally["outcome"][o]]
    rows = []
    for kind in KINDS:
        counts = [tally["kind"][(kind, o)] for o in used]
        if sum(counts):
            rows.append([kind, str(sum(counts)), *[str(c) if c else "" for c in counts]])
    print("Outcomes by mutation kind (an example with several edits counts under each):\n")
    print(table(rows, ["mutation", "examples", *used]))
    print()
    rows = []
    for name in fuzz.NATIVE_SEEDS + fuzz.COMPRESSED_SEEDS:
        counts = [tally["seed"][(name, o)] for o in used]
        if sum(counts):
            rows.append([name, str(sum(counts)), *[str(c) if c else "" for c in counts]])
    print("Outcomes by seed:\n")
    print(table(rows, ["seed", "examples", *used]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
