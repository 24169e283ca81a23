import numpy as np
import pandas as pd
import pytest

from ichd_ray import CLASSES
from ichd_ray.evaluation.labels import LabelsError, label_id, labels_for, parse_labels
from ichd_ray.io import storage
from ichd_ray.synthetic.generate import SynthConfig, generate


def rows(image: str, positives: set[str] = frozenset()) -> list[str]:
    """The six RSNA rows of one image, ``any`` derived from the subtypes."""
    values = {c: int(c in positives) for c in CLASSES[:5]}
    values["any"] = int(any(values.values()))
    return [f"{image}_{c},{values[c]}" for c in CLASSES]


def csv_text(*blocks: list[str]) -> str:
    return "\n".join(["ID,Label", *[line for block in blocks for line in block]]) + "\n"


def test_label_id_keeps_rsna_ids_and_prefixes_dotted_uids():
    assert label_id("ID_6431af929") == "ID_6431af929"
    assert label_id("1.2.840.113619.2.55") == "ID_1.2.840.113619.2.55"
    assert label_id("2.25.1234") == "ID_2.25.1234"


def test_parse_rsna_file_with_verbatim_duplicates():
    text = csv_text(
        rows("ID_abc123", {"subdural"}),
        rows("ID_1.2.840.10008.5"),
        rows("ID_abc123", {"subdural"})[:2],  # the official file repeats some rows verbatim
        rows("ID_9f_x2", {"epidural", "subarachnoid"}),  # an underscore inside the image id
    )
    table = parse_labels(text.encode())
    assert list(table.columns) == list(CLASSES)
    assert table.index.name == "image_id"
    assert list(table.index) == ["ID_abc123", "ID_1.2.840.10008.5", "ID_9f_x2"]  # first appearance
    assert (table.dtypes == np.uint8).all()
    assert table.loc["ID_abc123"].tolist() == [0, 0, 0, 0, 1, 1]
    assert table.loc["ID_1.2.840.10008.5"].tolist() == [0] * 6
    assert table.loc["ID_9f_x2"].tolist() == [1, 0, 0, 1, 0, 1]


def test_parse_tolerates_bom_blank_lines_and_spaces():
    text = "\ufeffID,Label\n" + "\n".join(r.replace(",", ", ") for r in rows("ID_a", {"epidural"})) + "\n\n"
    assert parse_labels(text).loc["ID_a"].tolist() == [1, 0, 0, 0, 0, 1]
    assert parse_labels(text.encode("utf-8")).shape == (1, 6)


@pytest.mark.parametrize(
    "text, message",
    [
        ("ID,Value\nID_a_any,1\n", r"missing column\(s\) Label"),
        ("Label\n1\n", r"missing column\(s\) ID"),
        ("", "empty file"),
        ("ID,Label\n", "no label rows"),
        (csv_text(rows("ID_a"), ["ID_a_chronic,0"]), r"line 8: 'ID_a_chronic'"),
        (csv_text(["noseparator,1"]), r"line 2: 'noseparator'"),
        (csv_text([r.replace(",0", ",2") if r.endswith("epidural,0") else r for r in rows("ID_a")]), r"not 0 or 1: line 2: 'ID_a_epidural,2'"),
        (csv_text([r.replace(",0", ",x") if r.endswith("subdural,0") else r for r in rows("ID_a")]), r"line 6: 'ID_a_subdural,x'"),
        (csv_text(rows("ID_a"), ["ID_a_epidural,1"]), r"1 ID\(s\) given conflicting labels: line 2: 'ID_a_epidural,0'; line 8: 'ID_a_epidural,1'"),
        (csv_text(rows("ID_a"), rows("ID_b")[:4]), r"1 image\(s\) without all 6 classes: 'ID_b' lacks subdural, any"),
        (csv_text(rows("ID_a"), [r.replace("any,1", "any,0") for r in rows("ID_b", {"subdural"})], [r.replace("any,0", "any,1") for r in rows("ID_c")]), r"2 image\(s\) with 'any' not equal to the max of the subtypes, e.g. 'ID_b', 'ID_c'"),
    ],
)
def test_errors_name_the_file_and_the_offender(text, message):
    with pytest.raises(LabelsError, match=r"^s3://bucket/stage_2_train\.csv: ") as info:
        parse_labels(text, name="s3://bucket/stage_2_train.csv")
    assert info.match(message)
    assert isinstance(info.value, ValueError)


def test_labels_for_looks_up_dotted_and_rsna_uids():
    table = parse_labels(csv_text(rows("ID_abc123", {"intraventricular"}), rows("ID_1.2.3", {"epidural"})))
    y, found = labels_for(["1.2.3", "ID_abc123", "9.9.9", "abc123"], table)
    assert y.dtype == np.uint8 and y.shape == (4, 6)
    assert found.tolist() == [True, True, False, True]
    assert y[0].tolist() == [1, 0, 0, 0, 0, 1]
    assert y[1].tolist() == [0, 0, 1, 0, 0, 1]
    assert y[2].tolist() == [0] * 6
    assert y[3].tolist() == y[1].tolist()  # a bare RSNA hash gets its ID_ prefix
    empty_y, empty_found = labels_for([], table)
    assert empty_y.shape == (0, 6) and empty_found.shape == (0,)


def read_labels(uri):
    """What evaluate and training do: storage reads the bytes, the labels module parses them."""
    return parse_labels(storage.read_bytes(uri), name=uri)


def test_round_trip_with_synth_labels(tmp_path):
    summary = generate(str(tmp_path), SynthConfig(studies=2, slices=6, size=64, seed=3))
    table = read_labels(str(tmp_path / "labels.csv"))
    assert list(table.columns) == list(CLASSES)
    assert len(table) == summary["slices"]
    assert table["any"].tolist() == table[list(CLASSES[:5])].max(axis=1).tolist()
    assert table.sum().to_dict() == summary["positive_slices"]
    sops = [p.stem for p in tmp_path.glob("*/*.dcm")]
    y, found = labels_for(sops, table)
    assert found.all() and y.sum() == sum(summary["positive_slices"].values())
    raw = pd.read_csv(tmp_path / "labels.csv")
    assert len(raw) == 6 * len(table)


def test_read_labels_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_labels(str(tmp_path / "nope.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,Label\nID_a_any,7\n")
    with pytest.raises(LabelsError, match="bad.csv"):
        read_labels(str(bad))
