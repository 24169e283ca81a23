"""Reading results as an analyst: ``query(OUT, SQL)`` over the committed tables' DuckDB views.

The public entry point README documents; the implementation lives in :mod:`ichd_ray.io.results`.
"""

from ichd_ray.io.results import connect, format_summary, query

__all__ = ["connect", "query", "format_summary"]
