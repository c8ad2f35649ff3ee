"""write_json: one JSON document, a record of each top-level list per line."""

from __future__ import annotations

import io
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gpu_router.report import write_json

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def written(data: dict[str, Any]) -> str:
    out = io.StringIO()
    write_json(data, out)
    return out.getvalue()


@given(st.dictionaries(st.text(max_size=8), values, max_size=6))
def test_the_document_reads_back_as_written(data: dict[str, Any]) -> None:
    assert json.loads(written(data)) == data


def test_each_record_of_a_top_level_list_is_one_line() -> None:
    nodes = [{"name": "a\nb", "gpus": [{"total": 1}, {"total": 2}]}, {"name": "c", "gpus": []}]
    text = written({"version": "1", "nodes": nodes, "actions": [], "summary": {"up": 2}})
    assert text.splitlines() == [
        "{",
        '  "version": "1",',
        '  "nodes": [',
        '    {"name": "a\\nb", "gpus": [{"total": 1}, {"total": 2}]},',
        '    {"name": "c", "gpus": []}',
        "  ],",
        '  "actions": [],',
        '  "summary": {"up": 2}',
        "}",
    ]
    assert [json.loads(line.strip().rstrip(",")) for line in text.splitlines()[3:5]] == nodes
