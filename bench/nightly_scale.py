"""``bench/nightly.py --scale``: the table work of one night at archive scale, without files.

Synthesises a committed index (40 slices a study, one in ten studies with a second, thin series, ETags,
sizes and mtimes) and tonight's listing of the same objects, unchanged or with a fraction of the
studies replaced (new ETags on every object of theirs), then times the steps ``make_plan`` runs after
listing, each in its own process per size so the peak RSS is that size's:

    read the committed index (Parquet) -> listing to Arrow -> diff -> header rows of what changed
    (synthesised: no S3 here) -> series rule over the live objects -> tonight's index -> plan
    (fingerprints) -> write the index (Parquet)

``--engine pandas`` runs the pandas code these steps had before issue 11 (``tests/reference_nightly.py``:
``diff_listing``, ``select_series``, ``study_fingerprints``, ``plan_studies``), for the profile.
S3 requests are what a real bucket would take for the same night: LIST pages of 1,000 keys, one ranged
GET per header read, the index objects read and written.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SLICES_PER_STUDY = 40


def synth_index(n_objects: int, run_id: str = "nightly-20261201-v1", seed: int = 0):
    """A committed index of ``n_objects`` (INDEX_SCHEMA), its series rule already applied (checked
    against ``select_series`` on small sizes by the caller's ``--check``)."""
    from ichd_ray.pipeline.nightly import INDEX_SCHEMA

    rng = np.random.default_rng(seed)
    i = np.arange(n_objects, dtype=np.int64)
    study = i // SLICES_PER_STUDY
    k = i % SLICES_PER_STUDY
    two = study % 10 == 0  # one study in ten has a second, 1.25 mm series of 20 slices
    series = np.where(two & (k >= SLICES_PER_STUDY // 2), 1, 0)
    text = lambda a: pc.cast(pa.array(a), pa.string())  # noqa: E731
    study_uid = pc.binary_join_element_wise("1.2.826.0.1.3680043.8.498.", text(study), "")
    series_uid = pc.binary_join_element_wise(study_uid, text(series), ".")
    sop_uid = pc.binary_join_element_wise(series_uid, text(k), ".")
    uri = pc.binary_join_element_wise("s3://archive/ct/", text(study % 997), "/", text(study), "/", text(i), ".dcm", "")
    thickness = np.where(series == 1, 1.25, 5.0)
    selected = series == 0
    slice_index = k  # z order; series 0 of a two-series study holds k = 0..19
    columns = {
        "uri": uri,
        "size": pa.array(525_000 + rng.integers(0, 4096, n_objects)),
        "mtime": pa.array(1.76e9 + rng.random(n_objects) * 1e7),
        "etag": pc.utf8_lower(text(rng.integers(1 << 40, 1 << 62, n_objects))),
        "study_uid": study_uid,
        "series_uid": series_uid,
        "sop_uid": sop_uid,
        "patient_hash": pc.binary_join_element_wise("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f0", text(study // 2), ""),
        "position": pa.array(np.where(series == 1, (k - 20) * 1.25, k * 5.0)),
        "instance_number": pa.array(k + 1),
        "rows": pa.array(np.full(n_objects, 512, np.int32)),
        "cols": pa.array(np.full(n_objects, 512, np.int32)),
        "pixel_spacing": pa.array(np.full(n_objects, 0.45)),
        "slice_thickness": pa.array(thickness),
        "normal_z": pa.array(np.ones(n_objects)),
        "image_type": pa.array(["ORIGINAL\\PRIMARY\\AXIAL"] * 1, pa.string()).take(pa.array(np.zeros(n_objects, np.int64))),
        "transfer_syntax": pa.array(["1.2.840.10008.1.2.1"], pa.string()).take(pa.array(np.zeros(n_objects, np.int64))),
        "reason": pa.nulls(n_objects, pa.string()),
        "message": pa.nulls(n_objects, pa.string()),
        "selected": pa.array(selected),
        "slice_index": pa.array(np.where(selected, slice_index, 0).astype(np.int32), mask=~selected),
        "deleted": pa.array(np.zeros(n_objects, bool)),
        "run_id": pa.array([run_id], pa.string()).take(pa.array(np.zeros(n_objects, np.int64))),
    }
    table = pa.table(columns)
    # the non-chosen series' rows say why, as the rule writes them
    message = pc.binary_join_element_wise("study ", study_uid, " scored with series ", pc.binary_join_element_wise(study_uid, "0", "."),
                                          " (rule: thickness nearest 5 mm, then most slices)", "")
    other = pa.array(~selected)
    table = table.set_column(table.schema.get_field_index("reason"), "reason", pc.if_else(other, "other_series", pa.nulls(n_objects, pa.string())))
    table = table.set_column(table.schema.get_field_index("message"), "message", pc.if_else(other, message, pa.nulls(n_objects, pa.string())))
    return table.cast(INDEX_SCHEMA).sort_by("uri")  # an index is in URI order, as listings are


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_size(n_objects: int, changed_fraction: float, engine: str, check: bool) -> dict:
    """One night at one size, in this process; returns the figures."""
    from ichd_ray.pipeline import incremental
    from ichd_ray.pipeline.nightly import INDEX_SCHEMA

    previous = synth_index(n_objects)
    if check:  # the synthetic index is what the series rule makes of it
        again = incremental.select_series(previous.drop_columns(["deleted", "run_id"]))
        assert again.equals(previous.drop_columns(["deleted", "run_id"])), "synth_index disagrees with select_series"
    fp = incremental.study_fingerprints(previous)
    scored = fp.append_column("model_version", pa.array(["v1"], pa.string()).take(pa.array(np.zeros(fp.num_rows, np.int64))))
    studies = fp.num_rows
    n_changed = int(round(studies * changed_fraction))
    changed_studies = set(np.random.default_rng(1).choice(studies, n_changed, replace=False).tolist()) if n_changed else set()
    study_no = np.arange(n_objects) // SLICES_PER_STUDY
    changed_mask = np.isin(study_no, np.fromiter(changed_studies, np.int64, len(changed_studies))) if changed_studies else np.zeros(n_objects, bool)
    etags = pc.if_else(pa.array(changed_mask), pc.binary_join_element_wise(previous.column("etag"), "x", ""), previous.column("etag"))
    listing_table = pa.table({"uri": previous.column("uri"), "size": previous.column("size"), "mtime": previous.column("mtime"), "etag": etags})
    listing_rows = listing_table.to_pylist()  # what list_inputs hands make_plan today: one Python object per key

    work = Path(tempfile.mkdtemp(prefix="ichd-nightly-scale-"))
    committed = work / "index.parquet"
    pq.write_table(previous, committed)
    del previous, listing_table
    setup_rss = _rss_mb()
    t: dict[str, float] = {}

    def step(name, fn):
        t0 = time.perf_counter()
        out = fn()
        t[name] = time.perf_counter() - t0
        return out

    if engine == "duckdb":
        prev = step("read committed index", lambda: pq.read_table(committed))
        listing = step("listing to Arrow", lambda: pa.Table.from_pylist(listing_rows, schema=incremental.LISTING_SCHEMA))
        unchanged, to_read, deleted = step("diff", lambda: incremental.diff_listing(prev, listing))
        columns = [c for c in INDEX_SCHEMA.names if c not in ("deleted", "run_id")]

        def headers():  # what read_headers_on_ray returns for the changed objects: their rows, new ETags
            rows = prev.filter(pc.is_in(prev.column("uri"), value_set=to_read.column("uri"))).select(columns)
            return rows.set_column(rows.schema.get_field_index("etag"), "etag", to_read.sort_by("uri").column("etag")) if rows.num_rows else rows

        fresh = step("header rows of changed objects", lambda: headers().sort_by("uri"))
        live = step("series rule over live objects", lambda: incremental.select_series(pa.concat_tables([unchanged.select(columns), fresh.cast(unchanged.select(columns).schema)])))
        index = step("tonight's index", lambda: incremental.night_index(live, deleted, "nightly-20261202-v1", INDEX_SCHEMA))
        plan = step("plan (fingerprints)", lambda: incremental.plan_studies(index, scored, "v1"))
        step("write index", lambda: pq.write_table(index, work / "tonight.parquet"))
        n_read, n_planned = to_read.num_rows, plan.num_rows
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import reference_nightly as ref

        prev = step("read committed index", lambda: pq.read_table(committed).to_pandas())
        listing = step("listing to Arrow", lambda: listing_rows)  # the pandas code took the list as it was
        unchanged, to_read, deleted = step("diff", lambda: ref.diff_listing(prev, listing))
        columns = [c for c in INDEX_SCHEMA.names if c not in ("deleted", "run_id")]

        def headers():
            new = {e["uri"]: e["etag"] for e in to_read}
            rows = prev[prev["uri"].isin(list(new))][columns].copy()
            rows["etag"] = rows["uri"].map(new)
            return rows

        import pandas as pd

        fresh = step("header rows of changed objects", headers)

        def rule():
            live = pd.concat([unchanged[columns], fresh], ignore_index=True)
            reasons = live["reason"].where(~live["reason"].isin(["duplicate", "other_series"]))
            live = live.assign(reason=reasons, message=live["message"].where(reasons.notna()))
            return ref.select_series(live, 5.0)

        live = step("series rule over live objects", rule)
        index = step("tonight's index", lambda: pd.concat([live.assign(deleted=False), deleted.drop(columns=["run_id"])], ignore_index=True).assign(run_id="r"))
        plan = step("plan (fingerprints)", lambda: ref.plan_studies(index, scored.to_pandas(), "v1"))
        step("write index", lambda: pq.write_table(pa.Table.from_pandas(index[INDEX_SCHEMA.names], schema=INDEX_SCHEMA, preserve_index=False), work / "tonight.parquet"))
        n_read, n_planned = len(to_read), len(plan)

    total = sum(t.values())
    index_bytes = (work / "tonight.parquet").stat().st_size
    for p in work.iterdir():
        p.unlink()
    work.rmdir()
    return {
        "engine": engine, "objects": n_objects, "studies": studies, "changed_fraction": changed_fraction,
        "headers_read": n_read, "studies_planned": n_planned, "expected_planned": n_changed,
        "steps_s": t, "total_s": total, "objects_per_s": n_objects / total,
        "peak_rss_mb": _rss_mb(), "setup_rss_mb": setup_rss, "index_parquet_mb": index_bytes / 1e6,
        "s3_requests": {"LIST": math.ceil(n_objects / 1000), "GET headers": n_read, "GET index": 1, "PUT index": 1},
    }


def run_scale(sizes: list[int], changed: list[float], engines: list[str], check: bool) -> list[dict]:
    """Each (size, changed fraction, engine) in a child process of its own (its own peak RSS)."""
    results = []
    for engine in engines:
        for n in sizes:
            for f in changed:
                cmd = [sys.executable, __file__, str(n), str(f), engine, "1" if check and n <= 100_000 else "0"]
                t0 = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                if done.returncode != 0:
                    print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                    results.append({"engine": engine, "objects": n, "changed_fraction": f, "error": done.stderr.strip().splitlines()[-1:]})
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result["process_s"] = time.perf_counter() - t0
                print(json.dumps(result), file=sys.stderr)
                results.append(result)
    return results


def table(results: list[dict]) -> str:
    steps = next((list(r["steps_s"]) for r in results if "steps_s" in r), [])
    head = "| engine | objects | changed | headers read | planned | " + " | ".join(steps) + " | total s | objects/s | peak RSS MB | index MB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['objects']:,} | {r['changed_fraction']:.0%} | failed: {r['error']} |")
            continue
        cells = " | ".join(f"{r['steps_s'][s]:.2f}" for s in steps)
        lines.append(f"| {r['engine']} | {r['objects']:,} | {r['changed_fraction']:.0%} | {r['headers_read']:,} | {r['studies_planned']:,} | "
                     f"{cells} | **{r['total_s']:.1f}** | {r['objects_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} | {r['index_parquet_mb']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    n, f, engine, check = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    result = one_size(n, f, engine, check)
    assert result["studies_planned"] == result["expected_planned"], result
    print(json.dumps(result))
