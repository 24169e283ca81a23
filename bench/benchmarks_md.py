"""Shared by the bench scripts: replace (or append) one marked section of BENCHMARKS.md."""

from __future__ import annotations

import re
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(key: str, title: str, text: str, path: Path = BENCHMARKS) -> None:
    """Put ``text`` between ``<!-- key:start -->`` and ``<!-- key:end -->``, under ``## title`` when new."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{start}\n{text}\n{end}"
    if start in doc:
        doc = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: section, doc, flags=re.S)
    else:
        doc = doc.rstrip("\n") + f"\n\n## {title}\n\n{section}\n"
    path.write_text(doc)
    print(f"\nwrote {path}", file=sys.stderr)
