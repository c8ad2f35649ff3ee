"""The indexes the planner uses on observed records: built once, never part of a record's value."""

from __future__ import annotations

from dataclasses import replace

from gpu_router.ollama import parse_tags
from gpu_router.state import InstalledModel, InstalledModels, LoadedModel, NodeState, NodeStatus

TAGS = {
    "models": [
        {"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 2019393189, "digest": "a80c4f17acd5"},
        {"name": "gpt-oss:120b-cloud", "size": 384, "remote_model": "gpt-oss:120b"},
    ]
}


def test_tags_come_indexed_and_still_equal_a_plain_tuple() -> None:
    installed = parse_tags(TAGS)
    assert isinstance(installed, InstalledModels)
    assert installed == tuple(installed)
    assert installed.by_name["llama3.2:latest"].size_bytes == 2019393189
    assert installed.by_name is installed.by_name  # built once, kept with the tags
    assert installed.remote_names == frozenset({"gpt-oss:120b-cloud"})


def test_a_node_s_indexes_do_not_change_its_value() -> None:
    plain = NodeState(
        "n",
        "http://n:11434",
        NodeStatus.UP,
        loaded=(LoadedModel("llama3.2:latest", 10, 10),),
        installed=(InstalledModel("llama3.2:latest", 5),),
    )
    indexed = replace(plain)
    assert indexed.installed_model("llama3.2:latest") == InstalledModel("llama3.2:latest", 5)
    assert indexed.loaded_model("llama3.2:latest") == LoadedModel("llama3.2:latest", 10, 10)
    assert indexed.installed_model("nope") is None
    assert indexed == plain
    assert repr(indexed) == repr(plain)
