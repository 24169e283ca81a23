"""ichd_ray.training.cnn without Ray: a fold is done only under its own key (the loop itself: test_recipe.py)."""

import json


def test_a_fold_is_done_only_under_its_own_key(tmp_path):

    from ichd_ray.training.cnn import cnn_weights_uri, finished_fold

    key, other = "a" * 64, "a" * 16 + "b" * 48  # same 16-digit prefix: the same file name
    uri = cnn_weights_uri(str(tmp_path), 0, key)
    assert uri.endswith(f"fold0-{'a' * 16}.safetensors") and uri == cnn_weights_uri(str(tmp_path), 0, other)
    assert finished_fold(uri, key, None) is None
    (tmp_path / "cnn").mkdir()
    open(uri, "wb").close()
    open(uri.replace(".safetensors", ".json"), "w").write(json.dumps({"key": key, "history": []}))
    assert finished_fold(uri, key, None)["key"] == key
    assert finished_fold(uri, other, None) is None
