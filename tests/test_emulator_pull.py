"""``/api/pull`` on emulated nodes: Ollama's status stream, its pace, its failures, cloud names."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import web
from daemon_helpers import MakeNode, wait_until

from gpu_router.emulator import CATALOGUE, EmulatedNode, Fault
from gpu_router.emulator.pull import normalize_pull_name

T = 10.0


def pull(node: EmulatedNode, body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    r = web.post(node.url + "/api/pull", json=body, timeout=T)
    return r.status_code, [json.loads(line) for line in r.text.splitlines()]


def installed(node: EmulatedNode) -> set[str]:
    return {m["name"] for m in web.get(node.url + "/api/tags", timeout=T).json()["models"]}


def test_pull_streams_ollamas_statuses_in_order_and_installs(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ())
    status, lines = pull(node, {"model": "llama3.2:1b"})
    assert status == 200
    statuses = [line["status"] for line in lines]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layers = [line for line in lines[1:-3]]
    assert all(line["status"] == f"pulling {line['digest'][7:19]}" for line in layers)
    assert all(line["digest"].startswith("sha256:") and len(line["digest"]) == 71 for line in layers)
    assert all(line["completed"] == line["total"] for line in layers)
    assert sum(line["total"] for line in layers) == CATALOGUE["llama3.2:1b"].file_size_bytes
    assert installed(node) == {"llama3.2:1b"}
    assert [r.path for r in node.mutating_requests()] == ["/api/pull"]


def test_pull_progress_over_time(make_node: MakeNode) -> None:
    spec = CATALOGUE["llama3.2:1b"]
    node = make_node("n", (8192,), (), pull_speed_bps=spec.file_size_bytes * 2)  # about half a second
    got: list[dict[str, Any]] = []
    r = web.stream("POST", node.url + "/api/pull", json={"model": "llama3.2:1b"}, timeout=T)
    for raw in r.iter_lines():
        got.append(json.loads(raw))
    model_lines = [line for line in got if line.get("digest") == got[1]["digest"]]
    assert len(model_lines) > 3
    assert "completed" not in model_lines[0]  # omitempty: nothing yet
    done = [line.get("completed", 0) for line in model_lines]
    assert done == sorted(done)
    assert done[-1] == model_lines[0]["total"]
    assert got[-1] == {"status": "success"}


def test_pull_without_streaming_returns_one_object(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ())
    r = web.post(node.url + "/api/pull", json={"model": "qwen3:8b", "stream": False}, timeout=T)
    assert (r.status_code, r.json()) == (200, {"status": "success"})
    assert installed(node) == {"qwen3:8b"}


def test_pull_of_an_installed_model_reports_every_blob_done(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ("llama3.2",))
    _, lines = pull(node, {"name": "llama3.2"})  # the deprecated "name" key still works
    layers = [line for line in lines if "digest" in line]
    assert len(layers) == 5  # model, template, license, params, config
    assert all(line["completed"] == line["total"] for line in layers)


def test_pull_of_an_unknown_model(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ())
    status, lines = pull(node, {"model": "no-such-model:7b"})
    assert status == 200  # the first line went out before the manifest failed
    assert lines == [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
    r = web.post(node.url + "/api/pull", json={"model": "no-such-model", "stream": False}, timeout=T)
    assert (r.status_code, r.json()) == (500, {"error": "pull model manifest: file does not exist"})
    r = web.post(node.url + "/api/pull", json={}, timeout=T)
    assert (r.status_code, r.json()) == (400, {"error": "model is required"})
    assert installed(node) == set()


def test_pull_fails_half_way(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ())
    node.set_fault(Fault.PULL_ERROR)
    status, lines = pull(node, {"model": "qwen3:8b"})
    assert status == 200
    assert lines[-1] == {"error": "max retries exceeded: unexpected EOF"}
    assert 0 < lines[-2]["completed"] < lines[-2]["total"]
    assert installed(node) == set()
    node.set_fault(Fault.PULL_NO_SPACE)
    r = web.post(node.url + "/api/pull", json={"model": "qwen3:8b", "stream": False}, timeout=T)
    assert r.status_code == 500
    error = r.json()["error"]
    assert error.startswith("write /usr/share/ollama/.ollama/models/blobs/sha256-")
    assert error.endswith("-partial: no space left on device")


def test_stalled_pull_keeps_the_connection_until_cleared(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ())
    node.set_fault(Fault.PULL_STALL)
    got: list[dict[str, Any]] = []

    def reader() -> None:
        r = web.stream("POST", node.url + "/api/pull", json={"model": "qwen3:8b"}, timeout=T)
        for raw in r.iter_lines():  # each line as it comes, not 512 bytes at a time
            got.append(json.loads(raw))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    wait_until(lambda: len(got) >= 2, what="the first progress lines")
    seen = len(got)
    time.sleep(0.3)  # not a timing check: a stalled stream sends nothing however long we wait
    assert len(got) == seen
    assert thread.is_alive()
    assert 0 < got[-1]["completed"] < got[-1]["total"]
    node.clear_fault()
    thread.join(T)
    assert got[-1] == {"status": "success"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("gpt-oss:20b:cloud", ("gpt-oss:20b-cloud", True)),
        ("gpt-oss:20b-cloud", ("gpt-oss:20b-cloud", True)),
        ("gpt-oss:cloud", ("gpt-oss:cloud", True)),
        ("gpt-oss:20b:local", ("gpt-oss:20b", False)),
        ("llama3.2", ("llama3.2", False)),
    ],
)
def test_cloud_names_resolve_as_ollama_resolves_them(raw: str, expected: tuple[str, bool]) -> None:
    assert normalize_pull_name(raw) == expected


def test_pulling_a_cloud_model_installs_its_stub(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ())
    status, lines = pull(node, {"model": "gpt-oss:20b:cloud"})
    assert (status, lines[-1]) == (200, {"status": "success"})
    assert installed(node) == {"gpt-oss:20b-cloud"}
    old = make_node("old", (8192,), (), version="0.11.10")  # no cloud models before v0.12.0
    assert pull(old, {"model": "gpt-oss:20b-cloud"})[1][-1] == {
        "error": "pull model manifest: file does not exist"
    }
