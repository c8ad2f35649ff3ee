"""The state directory: learned sizes by full key and the /api/show cache, never fatal, always atomic."""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from gpu_router.config import Config, GpuSpec, NodeConfig
from gpu_router.state import ModelInfo, ProjectorInfo, SsmInfo, TensorSummary, VisionInfo
from gpu_router.store import (
    FILE_NAME,
    INFO_FILE_NAME,
    InfoCache,
    SizeKey,
    SizeStore,
    info_cache_for,
    load_learned,
    store_for,
)

KEY = SizeKey("d" * 64, 4096, 1, "f16", "classic")
GIB = 2**30


def learn(store: SizeStore, key: SizeKey = KEY, size: int = 5 * GIB, **kw: int | None) -> bool:
    args: dict[str, int | None] = {"file_bytes": 4 * GIB, "total_vram_bytes": 24 * GIB}
    args.update(kw)
    return store.learn(key, size, model="m:latest", **args)


def test_learned_sizes_round_trip_by_their_whole_key(tmp_path: Path) -> None:
    store = SizeStore(tmp_path / FILE_NAME)
    assert store.load() == {}
    assert learn(store) is True
    assert learn(store) is False  # nothing new
    other = SizeKey("d" * 64, 131072, 1, "f16", "classic")  # same model, another context
    assert learn(store, other, 9 * GIB) is True
    assert store.save() is True
    again = SizeStore(tmp_path / FILE_NAME)
    assert again.load() == {KEY: 5 * GIB, other: 9 * GIB}
    # A size is only ever given for exactly its key.
    assert again.get(KEY) == 5 * GIB
    assert again.get(SizeKey("d" * 64, 4096, 4, "f16", "classic")) is None
    assert again.get(SizeKey("d" * 64, 4096, 1, "q8_0", "classic")) is None
    assert again.get(SizeKey("d" * 64, 4096, 1, "f16", "llama-server")) is None


@pytest.mark.parametrize(
    ("size", "file_bytes", "total", "why"),
    [
        (0, None, None, "not positive"),
        (-5, None, None, "not positive"),
        (3 * GIB, 4 * GIB, None, "below the model's file size"),
        (10**30, None, 24 * GIB, "above the node's total VRAM"),
    ],
)
def test_sizes_that_cannot_be_right_are_not_learned(
    tmp_path: Path,
    size: int,
    file_bytes: int | None,
    total: int | None,
    why: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = SizeStore(tmp_path / FILE_NAME)
    with caplog.at_level(logging.INFO, logger="gpu_router.store"):
        assert learn(store, size=size, file_bytes=file_bytes, total_vram_bytes=total) is False
    assert store.sizes == {}
    assert why in caplog.text


def test_an_old_name_keyed_file_is_dropped_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / FILE_NAME
    path.write_text(json.dumps({"version": 1, "models": {"m:latest": 7}}))
    store = SizeStore(path)
    with caplog.at_level(logging.WARNING, logger="gpu_router.store"):
        assert store.load() == {}
    assert "keyed by model name only" in caplog.text
    assert store.save() is True
    assert json.loads(path.read_text()) == {"version": 2, "sizes": []}


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"version": 99, "sizes": []}',
        b'["a"]',
        b'{"version": 2, "sizes": {}}',
        b"",
        b'{"version": 2, "sizes": [\xff\xfe]}',  # not UTF-8
        b"[" * 200_000,  # nested far beyond the parser's recursion limit
    ],
)
def test_a_corrupt_file_is_logged_and_rebuilt(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / FILE_NAME
    path.write_bytes(content)
    store = SizeStore(path)
    with caplog.at_level(logging.WARNING, logger="gpu_router.store"):
        assert store.load() == {}
    assert "is corrupt" in caplog.text
    assert store.save() is True  # rebuilt even with nothing learned yet
    assert json.loads(path.read_text()) == {"version": 2, "sizes": []}


def test_a_fifo_or_directory_in_its_place_never_hangs_or_crashes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fifo = tmp_path / FILE_NAME
    os.mkfifo(fifo)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(SizeStore(fifo).load()), daemon=True)
    with caplog.at_level(logging.WARNING, logger="gpu_router.store"):
        t.start()
        t.join(10)
    assert not t.is_alive(), "reading a FIFO blocked the start-up"
    assert result == [{}]
    assert "not a regular file" in caplog.text
    store = SizeStore(fifo)
    store.load()
    learn(store)
    assert store.save() is True  # the FIFO is replaced by a regular file
    assert fifo.is_file()
    sub = tmp_path / "dir"
    (sub / FILE_NAME).mkdir(parents=True)
    assert SizeStore(sub / FILE_NAME).load() == {}


def test_bad_entries_are_dropped_good_ones_kept(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    good = {
        "digest": "a" * 64,
        "context_length": 4096,
        "num_parallel": 1,
        "kv_cache_type": "f16",
        "era": "classic",
    }
    path.write_text(
        json.dumps(
            {
                "version": 2,
                "sizes": [
                    {**good, "size_bytes": 5},
                    {**good, "context_length": "x", "size_bytes": 5},
                    {**good, "num_parallel": 0, "size_bytes": 5},
                    {**good, "era": 3, "size_bytes": 5},
                    {**good, "digest": "b", "size_bytes": True},
                    {**good, "digest": "c", "size_bytes": -1},
                    "junk",
                ],
            }
        )
    )
    assert SizeStore(path).load() == {SizeKey("a" * 64, 4096, 1, "f16", "classic"): 5}


def test_an_unwritable_directory_is_a_log_line_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = SizeStore(blocker / "sub" / FILE_NAME)  # a directory under a regular file cannot exist
    learn(store)
    with caplog.at_level(logging.WARNING, logger="gpu_router.store"):
        assert store.save() is False
    assert "cannot save learned sizes" in caplog.text


def test_save_replaces_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    store = SizeStore(path)
    learn(store)
    store.save()
    inode = os.stat(path).st_ino
    learn(store, size=6 * GIB)
    store.save()
    assert os.stat(path).st_ino != inode  # a new file renamed over the old one, never rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME]


def test_store_and_cache_follow_the_config_state_dir(tmp_path: Path) -> None:
    cfg = Config(nodes=(NodeConfig("a", "http://a:11434", GpuSpec()),), state_dir=str(tmp_path))
    assert store_for(cfg).path == tmp_path / FILE_NAME
    assert info_cache_for(cfg).path == tmp_path / INFO_FILE_NAME
    store = store_for(cfg)
    learn(store)
    store.save()
    assert dict(load_learned(cfg)) == {KEY: 5 * GIB}


# ----------------------------------------------------------------------------- /api/show cache

INFO = ModelInfo(
    name="llama3.2:latest",
    architecture="llama",
    capabilities=("completion", "tools"),
    block_count=28,
    embedding_length=3072,
    head_count=24,
    head_count_kv=8,
    context_length=131072,
)


def test_model_info_survives_a_restart(tmp_path: Path) -> None:
    cache = InfoCache(tmp_path / INFO_FILE_NAME)
    assert cache.get("d1") is None
    cache.put("d1", INFO)
    assert cache.save() is True
    again = InfoCache(tmp_path / INFO_FILE_NAME)
    assert again.get("d1") == INFO
    assert len(again) == 1


FULL_INFO = replace(
    INFO,
    name="qwen2.5vl:7b",
    ssm=SsmInfo(conv_kernel=4, inner_size=8192, state_size=128, group_count=1),
    vision=VisionInfo(block_count=32, image_size=560, patch_size=14, max_pixels=1003520),
    projector=ProjectorInfo(parameter_count=5, file_type=1, architecture="clip"),
    tensors=TensorSummary(
        block_bytes=(100, 200),
        token_embd_bytes=300,
        has_output=True,
        attn_q_widths=(3584, 3584),
        cross_attention_layers=(1,),
    ),
    sliding_window_pattern=(True, False),
)


def test_model_info_with_its_parts_survives_a_restart(tmp_path: Path) -> None:
    # A show body with tensors, vision and projector parts: the cache once dropped these on reading
    # (a nested record was "a type it does not know"), so every report asked /api/show again.
    cache = InfoCache(tmp_path / INFO_FILE_NAME)
    cache.put("d1", FULL_INFO)
    assert cache.save() is True
    again = InfoCache(tmp_path / INFO_FILE_NAME)
    assert again.get("d1") == FULL_INFO


def test_a_part_of_the_wrong_shape_is_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / INFO_FILE_NAME
    cache = InfoCache(path)
    cache.put("d1", FULL_INFO)
    cache.put("d2", FULL_INFO)
    cache.put("d3", FULL_INFO)
    cache.save()
    data = json.loads(path.read_text())
    data["models"]["d2"]["tensors"]["block_bytes"] = ["100"]
    data["models"]["d3"]["vision"] = {"block_count": 32, "no_such_field": 1}
    path.write_text(json.dumps(data))
    mixed = InfoCache(path)
    assert (mixed.get("d1"), mixed.get("d2"), mixed.get("d3")) == (FULL_INFO, None, None)


def test_a_cache_from_another_version_or_with_wrong_types_is_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / INFO_FILE_NAME
    cache = InfoCache(path)
    cache.put("d1", INFO)
    cache.put("d2", INFO)
    cache.save()
    data = json.loads(path.read_text())
    data["models"]["d2"]["block_count"] = "28"  # a string where an int belongs
    data["models"]["d3"] = {**data["models"]["d1"], "no_such_field": 1}
    path.write_text(json.dumps(data))
    mixed = InfoCache(path)
    assert (mixed.get("d1"), mixed.get("d2"), mixed.get("d3")) == (INFO, None, None)
    data["schema"] = "something older"
    path.write_text(json.dumps(data))
    assert InfoCache(path).get("d1") is None


def test_a_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / INFO_FILE_NAME
    path.write_bytes(b"\xff" * 10)
    cache = InfoCache(path)
    assert len(cache) == 0
    cache.put("d1", INFO)
    assert cache.save() is True
    assert InfoCache(path).get("d1") == INFO


def test_a_memory_only_cache_writes_nothing(tmp_path: Path) -> None:
    cache = InfoCache(None)
    cache.put("d1", INFO)
    assert cache.save() is True
    assert cache.get("d1") == INFO
    assert list(tmp_path.iterdir()) == []
