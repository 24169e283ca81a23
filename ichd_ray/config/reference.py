"""The field reference of every config model, generated from the models themselves.

``docs/config.md`` is this module's output (``python -m ichd_ray.config.reference > docs/config.md``);
a test keeps it in sync, so a default can never differ from its documentation.
"""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel

from ichd_ray.config.demo import DemoConfig
from ichd_ray.config.job import JobConfig
from ichd_ray.config.train import TrainConfig

__all__ = ["CONFIGS", "markdown_reference", "json_schema"]

#: The top-level configs, by the command that reads them.
CONFIGS: dict[str, type[BaseModel]] = {"score / nightly (--config)": JobConfig, "train (--config)": TrainConfig,
                                       "demo (flags)": DemoConfig}


def _type_name(annotation: Any) -> str:
    text = str(annotation) if typing.get_origin(annotation) else getattr(annotation, "__name__", str(annotation))
    return text.replace("typing.", "").replace("Annotated[", "").replace("NoneType", "None")


def _constraints(info: Any) -> str:
    parts = []
    for item in info.metadata:
        for name, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "min length")):
            value = getattr(item, name, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    args = typing.get_args(info.annotation)
    if typing.get_origin(info.annotation) is typing.Literal:
        parts.append("one of " + ", ".join(repr(a) for a in args))
    return ", ".join(parts)


def _default(info: Any) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "(section)"
    return "`" + json.dumps(value if not isinstance(value, tuple) else list(value)) + "`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows, nested = [], []
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((annotation, dotted + "."))
            continue
        rows.append(f"| `{dotted}` | {_default(info)} | {_constraints(info)} | {info.description or ''} |")
    for sub, sub_prefix in nested:
        rows.extend(_rows(sub, sub_prefix))
    return rows


def markdown_reference() -> str:
    """Every field of every config: dotted name, default, what is allowed, what it does."""
    out = ["# Configuration reference", "",
           "Generated from the pydantic models in `ichd_ray/config/` by `python -m ichd_ray.config.reference`;",
           "`tests/test_reference.py` fails when this file and the models differ. Types are strict: `\"2\"` is not",
           "an integer and `1` is not `true`; an unknown field is an error naming the fields allowed.",
           "Training defaults below are the models' own; a recipe (`--recipe demo|rsna1st`, `ichd-ray recipes`) overrides many of them.", ""]
    for title, model in CONFIGS.items():
        out += [f"## {title}", "", "| field | default | allowed | meaning |", "|---|---|---|---|", *_rows(model, ""), ""]
    return "\n".join(out)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of each top-level config (``ichd-ray config --schema``)."""
    return {model.__name__: model.model_json_schema() for model in CONFIGS.values()}


if __name__ == "__main__":
    print(markdown_reference(), end="")
