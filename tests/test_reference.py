"""ichd_ray.config.reference: docs/config.md and the JSON Schema come from the models."""

def test_docs_config_md_is_generated_from_the_models():
    """docs/config.md is the models' own reference: regenerate it with
    ``python -m ichd_ray.config.reference > docs/config.md`` when a field changes."""
    from pathlib import Path

    from ichd_ray.config.reference import markdown_reference

    path = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert path.read_text() == markdown_reference()
    # every field appears with its default
    assert "| `score.num_actors` | `1` | >= 1 |" in path.read_text()
    assert "| `cnn.augment.hflip_p` | `0.5` |" in path.read_text()
