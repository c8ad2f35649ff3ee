"""Learned sizes: persisted atomically, never fatal when missing or corrupt."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from builders import cluster, loaded, node

from gpu_router.config import Config, GpuSpec, NodeConfig
from gpu_router.store import FILE_NAME, SizeStore, load_learned, store_for


def test_learns_only_models_fully_on_gpu_and_round_trips(tmp_path: Path) -> None:
    store = SizeStore(tmp_path / FILE_NAME)
    assert store.load() == {}
    state = cluster(node("a", loaded_models=(loaded("full:latest", 2), loaded("part:latest", 4, 1))))
    assert store.learn(state) is True
    assert store.learn(state) is False  # nothing new
    assert store.save() is True
    data = json.loads((tmp_path / FILE_NAME).read_text())
    assert data == {"version": 1, "models": {"full:latest": 2 * 2**30}}
    assert SizeStore(tmp_path / FILE_NAME).load() == {"full:latest": 2 * 2**30}


@pytest.mark.parametrize(
    "content",
    ["{not json", '{"version": 99, "models": {}}', '["a"]', '{"version": 1, "models": []}', ""],
)
def test_a_corrupt_file_is_logged_and_rebuilt(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / FILE_NAME
    path.write_text(content)
    store = SizeStore(path)
    with caplog.at_level(logging.WARNING, logger="gpu_router.store"):
        assert store.load() == {}
    assert "is corrupt" in caplog.text
    assert store.save() is True  # rebuilt even with nothing learned yet
    assert json.loads(path.read_text()) == {"version": 1, "models": {}}


def test_bad_entries_are_dropped_good_ones_kept(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    path.write_text(
        json.dumps(
            {"version": 1, "models": {"a:latest": 5, "b:latest": "x", "c:latest": -1, "d:latest": True}}
        )
    )
    assert SizeStore(path).load() == {"a:latest": 5}


def test_an_unwritable_directory_is_a_log_line_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = SizeStore(blocker / "sub" / FILE_NAME)  # a directory under a regular file cannot exist
    store.learn_one("m:latest", 10)
    with caplog.at_level(logging.WARNING, logger="gpu_router.store"):
        assert store.save() is False
    assert "cannot save learned sizes" in caplog.text


def test_save_replaces_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    store = SizeStore(path)
    store.learn_one("m:latest", 10)
    store.save()
    inode = os.stat(path).st_ino
    store.learn_one("m:latest", 11)
    store.save()
    assert os.stat(path).st_ino != inode  # a new file renamed over the old one, never rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME]


def test_store_follows_the_config_state_dir(tmp_path: Path) -> None:
    cfg = Config(nodes=(NodeConfig("a", "http://a:11434", GpuSpec()),), state_dir=str(tmp_path))
    assert store_for(cfg).path == tmp_path / FILE_NAME
    (tmp_path / FILE_NAME).write_text(json.dumps({"version": 1, "models": {"m:latest": 7}}))
    assert dict(load_learned(cfg)) == {"m:latest": 7}
