"""ichd_ray.pipeline.decode: a batch of studies -> one uint8 buffer of windowed slices, without Ray."""

import json

import numpy as np
import pyarrow as pa
import pytest

from dicom_factory import ct_bytes, head_like
from ichd_ray.dicom.preprocess import preprocess_slice
from ichd_ray.dicom.windowing import DEFAULT_WINDOWS
from ichd_ray.io import storage
from ichd_ray.pipeline.decode import DECODE_BASE_MEMORY, DECODED_SCHEMA, decode_memory, decode_studies

WINDOWS = [w.to_dict() for w in DEFAULT_WINDOWS]
SIZE = 16


def _study(tmp_path, uid: str, n: int, *, seed: int) -> dict:
    uris = []
    for j in range(n):
        path = tmp_path / f"{uid}-{j}.dcm"
        path.write_bytes(ct_bytes(head_like(32, seed=seed + j), position=(0.0, 0.0, 5.0 * j)))
        uris.append(str(path))
    return {"study_uid": uid, "series_uid": uid + ".1", "uris": uris, "sop_uids": [f"{uid}.{j}" for j in range(n)],
            "positions": [5.0 * j for j in range(n)], "slice_indices": list(range(n))}


def _batch(studies: list[dict]) -> pa.Table:
    fields = [DECODED_SCHEMA.field(n) for n in ("study_uid", "series_uid", "uris", "sop_uids", "positions", "slice_indices")]
    return pa.Table.from_pylist(studies, schema=pa.schema(fields))


def _images(out: pa.Table, i: int) -> np.ndarray:
    row = out.slice(i, 1)
    n = row["n_images"][0].as_py()
    return np.frombuffer(row["images"][0].as_buffer(), np.uint8).reshape(n, 3, SIZE, SIZE)


def test_each_study_is_its_slices_windowed_in_order(tmp_path):
    studies = [_study(tmp_path, "1.1", 3, seed=0), _study(tmp_path, "1.2", 2, seed=10)]
    out = decode_studies(_batch(studies), size=SIZE, windows=WINDOWS, rsna_fix=True, storage_config=None)
    assert out.schema == DECODED_SCHEMA and out["n_images"].to_pylist() == [3, 2]
    for i, study in enumerate(studies):
        expected = np.stack([preprocess_slice(open(u, "rb").read(), SIZE, windows=DEFAULT_WINDOWS) for u in study["uris"]])
        assert np.array_equal(_images(out, i), expected)
        assert json.loads(out["failures"][i].as_py()) == []
    assert out["sop_uids"].to_pylist() == [s["sop_uids"] for s in studies]


def test_a_bad_slice_is_left_out_and_named_and_the_study_goes_on(tmp_path):
    study = _study(tmp_path, "1.1", 3, seed=0)
    open(study["uris"][1], "wb").write(b"not a dicom at all")
    study["uris"].append(str(tmp_path / "gone.dcm"))  # listed, then deleted before the decode
    for key, value in (("sop_uids", "1.1.3"), ("positions", 15.0), ("slice_indices", 3)):
        study[key].append(value)
    out = decode_studies(_batch([study]), size=SIZE, windows=WINDOWS, rsna_fix=True, storage_config=None)
    assert out["n_images"].to_pylist() == [2]
    assert out["sop_uids"].to_pylist() == [["1.1.0", "1.1.2"]] and out["positions"].to_pylist() == [[0.0, 10.0]]
    failures = json.loads(out["failures"][0].as_py())
    assert [(f["uri"], f["stage"]) for f in failures] == [(study["uris"][1], "decode"), (study["uris"][3], "read")]
    assert failures[0]["reason"] and failures[1]["reason"] == "read_error"
    keep = [study["uris"][0], study["uris"][2]]
    assert np.array_equal(_images(out, 0), np.stack([preprocess_slice(open(u, "rb").read(), SIZE) for u in keep]))


def test_a_store_that_stopped_answering_stops_the_task(tmp_path, monkeypatch):
    """Not the object's fault: raised (the run stops uncommitted), never recorded as a rejected slice."""
    study = _study(tmp_path, "1.1", 2, seed=0)

    def unavailable(uri, config=None):
        raise storage.StorageUnavailable(uri, "503 Slow Down")

    monkeypatch.setattr(storage, "read_bytes", unavailable)
    with pytest.raises(storage.StorageUnavailable):
        decode_studies(_batch([study]), size=SIZE, windows=WINDOWS, rsna_fix=True, storage_config=None)


def test_decode_memory_is_the_pixel_buffer_twice_plus_a_base():
    assert decode_memory(4, 40, 3, 256) == DECODE_BASE_MEMORY + 2 * 4 * 40 * 3 * 256 * 256
