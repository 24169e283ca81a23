"""``bench/nightly.py --scale``: the table work of one night at archive scale, without DICOM files.

One child process synthesises the committed state as Parquet (an index of 40 slices a study, one in ten
studies with a second, thin series, ETags, sizes and mtimes; its study rows; what was scored) and
tonight's listing of the same objects, unchanged or with a fraction of the studies replaced (new ETags
on every object of theirs). Another child process then runs the night from those files, so its peak RSS
is the night's alone:

* ``--engine duckdb`` (issue 11): :func:`ichd_ray.pipeline.incremental.plan_night` over DuckDB views of
  the Parquet (read lazily, 2 GB memory limit): listing (Arrow, as the S3 Inventory reader gives it) ->
  diff -> header rows of what changed (synthesised from the index: no S3 here) -> series rule and study
  rows of the touched studies -> plan; then the rows to score and the changes written.
* ``--engine pandas``: the pandas code these steps had before issue 11 (``tests/reference_nightly.py``),
  over the whole index every night, as ``make_plan`` ran it (listing as one Python object per key).

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


def prepare(n_objects: int, changed_fraction: float, work: Path, check: bool) -> dict:
    """Write the committed state (index, study rows, scored) and tonight's listing as Parquet under
    ``work``, in a process of its own, so the night's process holds only what a night holds."""
    from ichd_ray.pipeline import incremental

    previous = synth_index(n_objects)
    if check:  # the synthetic index is what the series rule makes of it
        again = incremental.select_series(previous.drop_columns(["deleted", "run_id"]))
        assert again.equals(previous.drop_columns(["deleted", "run_id"])), "synth_index disagrees with select_series"
    study_rows = incremental.study_rows(previous, "nightly-20261201-v1")
    scored = study_rows.select(["study_uid", "fingerprint"]).append_column(
        "model_version", pa.array(["v1"], pa.string()).take(pa.array(np.zeros(study_rows.num_rows, np.int64))))
    studies = study_rows.num_rows
    n_changed = int(round(studies * changed_fraction))
    changed_studies = np.random.default_rng(1).choice(studies, n_changed, replace=False) if n_changed else np.array([], np.int64)
    changed_mask = np.isin(np.arange(n_objects) // SLICES_PER_STUDY, changed_studies)
    etags = pc.if_else(pa.array(changed_mask), pc.binary_join_element_wise(previous.column("etag"), "x", ""), previous.column("etag"))
    listing = pa.table({"uri": previous.column("uri"), "size": previous.column("size"), "mtime": previous.column("mtime"), "etag": etags})
    pq.write_table(previous, work / "index.parquet")
    pq.write_table(study_rows, work / "studies.parquet")
    pq.write_table(scored, work / "scored.parquet")
    pq.write_table(listing, work / "listing.parquet")
    return {"studies": studies, "expected_planned": n_changed}


def one_size(n_objects: int, changed_fraction: float, engine: str, work: Path, studies: int, n_changed: int) -> dict:
    """One night at one size, in this process, from the files :func:`prepare` wrote; returns the figures."""
    from ichd_ray.pipeline import incremental
    from ichd_ray.pipeline.nightly import INDEX_SCHEMA

    committed = work / "index.parquet"
    setup_rss = _rss_mb()
    t: dict[str, float] = {}

    def step(name, fn):
        t0 = time.perf_counter()
        out = fn()
        t[name] = time.perf_counter() - t0
        return out

    if engine == "duckdb":
        import duckdb

        # Arrow, as the inventory reader hands it over: no Python object per key
        listing = step("listing to Arrow", lambda: pq.read_table(work / "listing.parquet"))
        studies_uri, scored_uri = work / "studies.parquet", work / "scored.parquet"
        con = duckdb.connect()
        con.execute("SET memory_limit = '2GB'")
        con.execute(f"CREATE VIEW previous AS SELECT * FROM read_parquet('{committed}') WHERE NOT deleted")
        con.execute(f"CREATE VIEW previous_studies AS SELECT * FROM read_parquet('{studies_uri}')")
        con.execute(f"CREATE VIEW last_scored AS SELECT * FROM read_parquet('{scored_uri}')")
        con.register("listing", listing)
        columns = [c for c in INDEX_SCHEMA.names if c not in ("deleted", "run_id")]

        def headers(rows):  # what read_headers_on_ray returns for the changed objects: their rows, new ETags
            t0 = time.perf_counter()
            con.register("_want", rows)
            out = con.sql("SELECT p.* EXCLUDE (etag, deleted, run_id), w.etag FROM previous p JOIN _want w USING (uri) ORDER BY uri")
            out = out.to_arrow_table().select(columns).cast(INDEX_SCHEMA.remove(INDEX_SCHEMA.get_field_index("run_id")).remove(
                INDEX_SCHEMA.get_field_index("deleted")))
            t["header rows of changed objects (synthesised)"] = time.perf_counter() - t0
            return out

        night = step("plan_night: diff, headers, rule, study rows, plan", lambda: incremental.plan_night(
            con, headers, model_version="v1", run_id="nightly-20261202-v1", preferred_thickness_mm=5.0, index_schema=INDEX_SCHEMA))
        t["plan_night: diff, headers, rule, study rows, plan"] -= t.get("header rows of changed objects (synthesised)", 0.0)
        rows = step("rows to score", lambda: incremental.planned_rows(con, night))
        step("write index", lambda: (pq.write_table(night.index, work / "tonight.parquet"),
                                     pq.write_table(night.studies, work / "tonight-studies.parquet")))
        n_read, n_planned = night.read.num_rows, night.plan.num_rows
        assert rows.num_rows == n_changed * SLICES_PER_STUDY, (rows.num_rows, n_changed)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import reference_nightly as ref

        prev = step("read committed index", lambda: pq.read_table(committed).to_pandas())
        # list_inputs handed the pandas code one Python object per key
        listing = step("listing to Arrow", lambda: pq.read_table(work / "listing.parquet").to_pylist())
        scored = pq.read_table(work / "scored.parquet")
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
    return {
        "engine": engine, "objects": n_objects, "studies": studies, "changed_fraction": changed_fraction,
        "headers_read": n_read, "studies_planned": n_planned, "expected_planned": n_changed,
        "steps_s": t, "total_s": total, "objects_per_s": n_objects / total,
        "peak_rss_mb": _rss_mb(), "setup_rss_mb": setup_rss, "index_parquet_mb": index_bytes / 1e6,
        "s3_requests": {"LIST": math.ceil(n_objects / 1000), "GET headers": n_read, "GET index objects": 1 if engine == "pandas" else 3,
                        "PUT index objects": 1 if engine == "pandas" else 2},
    }


def run_scale(sizes: list[int], changed: list[float], engines: list[str], check: bool) -> list[dict]:
    """Each (size, changed fraction, engine): the files written by one child process, the night timed in
    another (its peak RSS is the night's alone)."""
    results = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for n in sizes:
        for f in changed:
            work = Path(tempfile.mkdtemp(prefix="ichd-nightly-scale-"))
            try:
                done = subprocess.run([sys.executable, __file__, "prepare", str(n), str(f), str(work), "1" if check and n <= 100_000 else "0"],
                                      capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                    results += [{"engine": e, "objects": n, "changed_fraction": f, "error": done.stderr.strip().splitlines()[-1:]} for e in engines]
                    continue
                meta = json.loads(done.stdout.strip().splitlines()[-1])
                for engine in engines:
                    t0 = time.perf_counter()
                    done = subprocess.run([sys.executable, __file__, "night", str(n), str(f), str(work), engine,
                                           str(meta["studies"]), str(meta["expected_planned"])], capture_output=True, text=True, env=env)
                    if done.returncode != 0:
                        print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                        results.append({"engine": engine, "objects": n, "changed_fraction": f, "error": done.stderr.strip().splitlines()[-1:]})
                        continue
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    result["process_s"] = time.perf_counter() - t0
                    print(json.dumps(result), file=sys.stderr)
                    results.append(result)
            finally:
                for p in work.iterdir():
                    p.unlink()
                work.rmdir()
    return results


def table(results: list[dict]) -> str:
    """One Markdown table per engine (their steps differ)."""
    out = []
    for engine in dict.fromkeys(r["engine"] for r in results):
        rows = [r for r in results if r["engine"] == engine]
        steps = next((list(r["steps_s"]) for r in rows if "steps_s" in r), [])
        head = "| engine | objects | changed | headers read | planned | " + " | ".join(steps) + " | total s | objects/s | peak RSS MB (after imports) | index written MB |"
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['engine']} | {r['objects']:,} | {r['changed_fraction']:.0%} | failed: {r['error']} |")
                continue
            cells = " | ".join(f"{r['steps_s'].get(s, 0.0):.2f}" for s in steps)
            lines.append(f"| {r['engine']} | {r['objects']:,} | {r['changed_fraction']:.0%} | {r['headers_read']:,} | {r['studies_planned']:,} | "
                         f"{cells} | **{r['total_s']:.1f}** | {r['objects_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} ({r['setup_rss_mb']:,.0f}) | {r['index_parquet_mb']:.2f} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        print(json.dumps(prepare(int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]), sys.argv[5] == "1")))
    else:
        n, f, work, engine, studies, expected = int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]), sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
        result = one_size(n, f, engine, work, studies, expected)
        assert result["studies_planned"] == result["expected_planned"], result
        print(json.dumps(result))
