"""The Ollama adapter: parsing of real response bodies, and OllamaClient over real HTTP on 127.0.0.1."""

from __future__ import annotations

import copy
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rawserver import CA_FILE, RawServer, closed_after, response, serve_requests, server_tls_context

from gpu_router.ollama import (
    ApiError,
    BadResponse,
    NodeUnreachable,
    OllamaClient,
    OllamaError,
    parse_ps,
    parse_show,
    parse_tags,
    parse_timestamp,
)
from gpu_router.state import LoadedModel, NodeStatus, Processor

FIXTURES = Path(__file__).parent / "fixtures" / "ollama"
SECRET = "Bearer s3cr3t-t0ken-do-not-leak"
UTC = timezone.utc
PDT = timezone(timedelta(hours=-7))


def load_fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def ps_entry(**overrides: Any) -> dict[str, Any]:
    """One /api/ps entry shaped like the real one, with ``overrides`` applied (None deletes a key)."""
    entry: dict[str, Any] = {
        "name": "llama3.2:latest",
        "model": "llama3.2:latest",
        "size": 3_300_000_000,
        "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M",
        },
        "expires_at": "2025-10-17T16:47:07.93355-07:00",
        "size_vram": 3_300_000_000,
        "context_length": 4096,
    }
    for key, value in overrides.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    return entry


# --------------------------------------------------------------------------------------------------
# Timestamps


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # api.md example: 5 fractional digits and a negative offset
        ("2024-06-04T14:38:31.83753-07:00", datetime(2024, 6, 4, 14, 38, 31, 837530, tzinfo=PDT)),
        # Go's RFC3339Nano: 9 digits, truncated to microseconds
        ("2025-08-14T15:49:43.634137516-07:00", datetime(2025, 8, 14, 15, 49, 43, 634137, tzinfo=PDT)),
        ("2024-09-12T21:17:29.110811Z", datetime(2024, 9, 12, 21, 17, 29, 110811, tzinfo=UTC)),
        ("2025-10-17T23:47:07Z", datetime(2025, 10, 17, 23, 47, 7, tzinfo=UTC)),
        # keep_alive -1: now + MaxInt64 ns lands ~292 years ahead
        (
            "2318-09-21T14:02:10.123456789+02:00",
            datetime(2318, 9, 21, 12, 2, 10, 123456, tzinfo=UTC),
        ),
        # Go's zero time.Time, what `ollama ps` prints as "Never"
        ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
        ("2024-06-04T14:38:31+0530", datetime(2024, 6, 4, 9, 8, 31, tzinfo=UTC)),
    ],
)
def test_parse_timestamp_real_formats(text: str, expected: datetime) -> None:
    parsed = parse_timestamp(text)
    assert parsed is not None
    assert parsed.tzinfo is not None
    assert parsed == expected


def test_parse_timestamp_keeps_the_offset_it_was_given() -> None:
    parsed = parse_timestamp("2024-06-04T14:38:31.83753-07:00")
    assert parsed is not None
    assert parsed.utcoffset() == timedelta(hours=-7)
    assert parsed.astimezone(UTC) == datetime(2024, 6, 4, 21, 38, 31, 837530, tzinfo=UTC)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "soon",
        "Forever",
        "2024-06-04",
        "2024-06-04T14:38",
        "2024-13-01T00:00:00Z",  # month 13
        "2024-02-30T00:00:00Z",  # no such day
        "2024-06-04T25:00:00Z",
        "2024-06-04T14:38:31.83753-07:00 trailing",
        "1717537111",
    ],
)
def test_parse_timestamp_garbage_is_none(text: str) -> None:
    assert parse_timestamp(text) is None


@pytest.mark.parametrize("text", ["2024-01-01T00:00:00+24:00", "2024-01-01T00:00:00-99:00"])
def test_parse_timestamp_out_of_range_offset_is_none(text: str) -> None:
    assert parse_timestamp(text) is None


def _rfc3339nano(dt: datetime, extra_ns: int) -> str:
    # Go trims trailing zeros of the fraction, and drops the dot when nothing is left
    frac = f"{dt.microsecond:06d}{extra_ns:03d}".rstrip("0")
    offset = dt.utcoffset()
    assert offset is not None
    minutes = int(offset.total_seconds()) // 60
    if minutes == 0:
        zone = "Z"
    else:
        sign = "-" if minutes < 0 else "+"
        zone = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
        + (f".{frac}" if frac else "")
        + zone
    )


@given(
    naive=st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)),
    offset_min=st.integers(-(23 * 60 + 59), 23 * 60 + 59),
    extra_ns=st.integers(0, 999),
)
def test_parse_timestamp_reads_any_rfc3339nano(naive: datetime, offset_min: int, extra_ns: int) -> None:
    dt = naive.replace(tzinfo=timezone(timedelta(minutes=offset_min)))
    parsed = parse_timestamp(_rfc3339nano(dt, extra_ns))
    assert parsed == dt
    assert parsed is not None
    assert parsed.utcoffset() == dt.utcoffset()


# --------------------------------------------------------------------------------------------------
# /api/ps


def test_parse_ps_docs_example_without_context_length() -> None:
    (m,) = parse_ps(load_fixture("ps-docs.json"))
    assert m == LoadedModel(
        name="mistral:latest",
        size_bytes=5137025024,
        vram_bytes=5137025024,
        digest="2ae6f6dd7a3dd734790bbbf58b8909a606e0e7e97e94b7604e0aa7ae4490e6d8",
        expires_at=datetime(2024, 6, 4, 14, 38, 31, 837530, tzinfo=PDT),
        context_length=None,
    )
    assert m.processor is Processor.GPU
    assert m.processor_label == "100% GPU"


def test_parse_ps_openapi_example_with_context_length() -> None:
    (m,) = parse_ps(load_fixture("ps-openapi.json"))
    assert m.name == "gemma4"
    assert m.size_bytes == 6591830464
    assert m.vram_bytes == 5333539264
    assert m.context_length == 4096
    assert m.digest == "c6eb396dbd5992bbe3f5cdb947e8bbc0ee413d7c17e2beaae69f5d569cf982eb"
    assert m.expires_at == datetime(2025, 10, 17, 16, 47, 7, 933550, tzinfo=PDT)
    assert m.processor is Processor.PARTIAL
    # 1258291200 / 6591830464 = 19.09% on CPU
    assert m.processor_label == "19%/81% CPU/GPU"


def test_parse_ps_pinned_partial_and_cpu_models() -> None:
    pinned, partial, cpu = parse_ps(load_fixture("ps-pinned.json"))
    assert pinned.name == "llama3.1:8b"
    assert pinned.expires_at == datetime(2318, 9, 21, 12, 2, 10, 123456, tzinfo=UTC)
    assert pinned.context_length == 8192
    assert pinned.processor is Processor.GPU
    assert partial.name == "qwen2.5:32b"
    assert partial.expires_at == datetime(2025, 10, 17, 23, 52, 7, tzinfo=UTC)
    assert partial.processor is Processor.PARTIAL
    assert partial.processor_label == "25%/75% CPU/GPU"
    assert cpu.name == "nomic-embed-text:latest"
    assert cpu.vram_bytes == 0
    assert cpu.processor is Processor.CPU
    assert cpu.processor_label == "100% CPU"
    assert cpu.context_length == 2048


@pytest.mark.parametrize("body", [{"models": []}, {"models": None}, {}])
def test_parse_ps_nothing_loaded(body: Any) -> None:
    assert parse_ps(body) == ()


def test_parse_ps_families_null_and_unknown_fields_are_ignored() -> None:
    details = {"format": "gguf", "family": "llama", "families": None, "future_field": {"x": [1, 2]}}
    body = {
        "models": [ps_entry(details=details, remote_host="https://ollama.com", shiny_new=[1, "two", None])],
        "total": 1,
        "next_page": None,
    }
    (m,) = parse_ps(body)
    assert m.name == "llama3.2:latest"
    assert m.size_bytes == 3_300_000_000
    assert m.context_length == 4096


def test_parse_ps_name_falls_back_to_name_when_model_missing() -> None:
    (m,) = parse_ps({"models": [ps_entry(model=None, name="qwen3:8b")]})
    assert m.name == "qwen3:8b"


@pytest.mark.parametrize(
    ("digest", "expected"),
    [
        ("2ae6f6dd7a3dd734790bbbf58b8909a606e0e7e97e94b7604e0aa7ae4490e6d8", "2ae6f6dd7a3d"),
        ("sha256:2ae6f6dd7a3dd734790bbbf58b8909a606e0e7e97e94b7604e0aa7ae4490e6d8", "2ae6f6dd7a3d"),
    ],
)
def test_parse_ps_and_tags_digest_with_and_without_prefix(digest: str, expected: str) -> None:
    (loaded,) = parse_ps({"models": [ps_entry(digest=digest)]})
    (installed,) = parse_tags({"models": [{"name": "x:latest", "size": 1, "digest": digest}]})
    for parsed in (loaded.digest, installed.digest):
        assert parsed == "2ae6f6dd7a3dd734790bbbf58b8909a606e0e7e97e94b7604e0aa7ae4490e6d8"
        assert parsed[:12] == expected  # the ID column of `ollama ps`


@pytest.mark.parametrize(
    ("expires", "expected"),
    [
        ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
        ("not a time", None),
        (None, None),
        (1717537111, None),
    ],
)
def test_parse_ps_expires_at_odd_values(expires: Any, expected: datetime | None) -> None:
    entry = ps_entry()
    entry["expires_at"] = expires
    (m,) = parse_ps({"models": [entry]})
    assert m.expires_at == expected


@pytest.mark.parametrize(
    ("size", "vram", "processor", "label"),
    [
        (100, 100, Processor.GPU, "100% GPU"),
        (100, 0, Processor.CPU, "100% CPU"),
        (100, 42, Processor.PARTIAL, "58%/42% CPU/GPU"),
        (100, 99, Processor.PARTIAL, "1%/99% CPU/GPU"),
        (3, 1, Processor.PARTIAL, "67%/33% CPU/GPU"),
        (100, 101, Processor.GPU, "Unknown"),
        (0, 0, Processor.CPU, "100% CPU"),
    ],
)
def test_processor_and_label_as_ollama_ps(size: int, vram: int, processor: Processor, label: str) -> None:
    (m,) = parse_ps({"models": [ps_entry(size=size, size_vram=vram)]})
    assert m.processor is processor
    assert m.processor_label == label


def test_processor_label_rounds_half_away_from_zero_like_go() -> None:
    assert LoadedModel("m", size_bytes=8, vram_bytes=7).processor_label == "13%/87% CPU/GPU"


def test_parse_ps_accepts_integral_float_sizes() -> None:
    (m,) = parse_ps({"models": [ps_entry(size=1024.0, size_vram=512.0)]})
    assert m.size_bytes == 1024
    assert isinstance(m.size_bytes, int)
    assert m.vram_bytes == 512


# --------------------------------------------------------------------------------------------------
# Wrong shapes


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ([], "expected a JSON object, got list"),
        ("models", "expected a JSON object, got str"),
        (None, "expected a JSON object, got NoneType"),
        ({"models": "x"}, "'models' is str, not a list"),
        ({"models": {"name": "a"}}, "'models' is dict, not a list"),
        ({"models": ["llama3.2:latest"]}, "models[0] is str, not an object"),
        ({"models": [ps_entry(), 7]}, "models[1] is int, not an object"),
        ({"models": [ps_entry(size=None)]}, "models[0] lacks name, size or size_vram"),
        ({"models": [ps_entry(size_vram=None)]}, "models[0] lacks name, size or size_vram"),
        ({"models": [ps_entry(name=None, model=None)]}, "models[0] lacks name, size or size_vram"),
        ({"models": [ps_entry(size="5137025024")]}, "models[0] lacks name, size or size_vram"),
        ({"models": [ps_entry(size=1.5)]}, "models[0] lacks name, size or size_vram"),
    ],
)
def test_parse_ps_wrong_shapes(body: Any, needle: str) -> None:
    with pytest.raises(BadResponse) as info:
        parse_ps(body, "gpu7")
    err = info.value
    assert needle in str(err)
    assert "/api/ps" in str(err)
    assert str(err).startswith("gpu7: ")
    assert err.node == "gpu7"
    assert err.status is NodeStatus.ERROR


@pytest.mark.parametrize("field_name", ["size", "size_vram"])
def test_parse_ps_bool_is_not_a_size(field_name: str) -> None:
    with pytest.raises(BadResponse, match=r"models\[0\] lacks name, size or size_vram"):
        parse_ps({"models": [ps_entry(**{field_name: True})]})


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ([{"name": "a", "size": 1}], "expected a JSON object, got list"),
        ({"models": "x"}, "'models' is str, not a list"),
        ({"models": ["deepseek-r1:latest"]}, "models[0] is str, not an object"),
        ({"models": [{"name": "deepseek-r1:latest"}]}, "models[0] lacks name or size"),
        ({"models": [{"name": "deepseek-r1:latest", "size": True}]}, "models[0] lacks name or size"),
        ({"models": [{"size": 5}]}, "models[0] lacks name or size"),
    ],
)
def test_parse_tags_wrong_shapes(body: Any, needle: str) -> None:
    with pytest.raises(BadResponse) as info:
        parse_tags(body, "gpu7")
    assert needle in str(info.value)
    assert "/api/tags" in str(info.value)


@pytest.mark.parametrize("body", [[], "x", None, 42])
def test_parse_show_wrong_shapes(body: Any) -> None:
    with pytest.raises(BadResponse, match="/api/show llama3: expected a JSON object"):
        parse_show(body, "llama3", "gpu7")


# --------------------------------------------------------------------------------------------------
# /api/tags


def test_parse_tags_docs_example() -> None:
    r1, llama = parse_tags(load_fixture("tags-docs.json"))
    assert r1.name == "deepseek-r1:latest"
    assert r1.size_bytes == 4683075271
    assert r1.digest == "0a8c266910232fd3291e71e5ba1e058cc5af9d411192cf88b6d30e92b6e73163"
    assert (r1.family, r1.parameter_size, r1.quantization_level) == ("qwen2", "7.6B", "Q4_K_M")
    assert llama.name == "llama3.2:latest"
    assert llama.size_bytes == 2019393189
    assert (llama.family, llama.parameter_size, llama.quantization_level) == ("llama", "3.2B", "Q4_K_M")


def test_parse_tags_openapi_example() -> None:
    (m,) = parse_tags(load_fixture("tags-openapi.json"))
    assert m.name == "gemma4"
    assert m.size_bytes == 9608350245
    assert m.digest == "c6eb396dbd5992bbe3f5cdb947e8bbc0ee413d7c17e2beaae69f5d569cf982eb"
    assert m.family == "gemma4"
    assert m.quantization_level == "Q4_K_M"


@pytest.mark.parametrize("details", [None, {"families": None}, "gguf"])
def test_parse_tags_missing_or_odd_details(details: Any) -> None:
    body = {"models": [{"name": "a:latest", "size": 10, "details": details, "remote_host": "x"}]}
    (m,) = parse_tags(body)
    assert (m.name, m.size_bytes, m.family, m.parameter_size, m.digest) == ("a:latest", 10, "", "", "")


@pytest.mark.parametrize("body", [{"models": []}, {"models": None}])
def test_parse_tags_nothing_installed(body: Any) -> None:
    assert parse_tags(body) == ()


# --------------------------------------------------------------------------------------------------
# /api/show


def test_parse_show_llama_docs_example() -> None:
    info = parse_show(load_fixture("show-llama.json"), "llama3.1:8b")
    assert info.name == "llama3.1:8b"
    assert info.architecture == "llama"
    assert info.block_count == 32
    assert info.embedding_length == 4096
    assert info.head_count == 32
    assert info.head_count_kv == 8
    assert info.context_length == 8192
    assert info.vocab_size == 128256
    assert info.key_length is None
    assert info.value_length is None
    assert info.capabilities == ("completion", "vision")
    assert info.embedding_only is False
    # the modelfile says PARAMETER num_ctx 4096, but `parameters` (what Ollama applies) does not
    assert info.num_ctx is None


def test_parse_show_gemma4_openapi_example() -> None:
    info = parse_show(load_fixture("show-gemma4.json"), "gemma4")
    assert info.architecture == "gemma4"
    assert info.block_count == 42
    assert info.embedding_length == 2560
    assert info.head_count == 8
    assert info.head_count_kv == 2
    assert info.key_length == 512  # not key_length_swa (256)
    assert info.value_length == 512
    assert info.context_length == 131072
    assert info.vocab_size is None  # tokenizer.ggml.tokens is null without verbose
    assert info.num_ctx == 2048
    assert info.capabilities == ("completion", "vision")
    assert info.embedding_only is False


def test_parse_show_per_layer_head_count_kv_takes_the_max() -> None:
    body = {
        "model_info": {
            "general.architecture": "openelm",
            "openelm.block_count": 6,
            "openelm.context_length": 2048,
            "openelm.embedding_length": 1280,
            "openelm.attention.head_count": [12, 12, 16, 16, 20, 20],
            "openelm.attention.head_count_kv": [3, 3, 4, 4, 5, 0],
        },
        "capabilities": ["completion"],
    }
    info = parse_show(body, "openelm")
    assert info.head_count_kv == 5
    assert info.head_count == 20
    assert info.block_count == 6


def test_parse_show_empty_or_garbage_array_is_unknown() -> None:
    body = {
        "model_info": {
            "general.architecture": "x",
            "x.attention.head_count_kv": [],
            "x.attention.head_count": ["a", None, True],
            "x.block_count": 0,
        }
    }
    info = parse_show(body, "x")
    assert info.head_count_kv is None
    assert info.head_count is None
    assert info.block_count is None  # zero is not a layer count


def test_parse_show_embedding_model() -> None:
    info = parse_show(load_fixture("show-nomic-embed.json"), "nomic-embed-text")
    assert info.architecture == "nomic-bert"
    assert info.capabilities == ("embedding",)
    assert info.embedding_only is True
    assert info.block_count == 12
    assert info.embedding_length == 768
    assert info.head_count == 12
    assert info.head_count_kv is None
    assert info.context_length == 2048
    assert info.num_ctx == 8192  # Ollama pads the key: "num_ctx                        8192"


@pytest.mark.parametrize("caps", ["absent", None])
def test_parse_show_old_build_without_capabilities_uses_pooling_type(caps: object) -> None:
    body = load_fixture("show-nomic-embed.json")
    if caps == "absent":
        del body["capabilities"]
    else:
        body["capabilities"] = caps
    info = parse_show(body, "nomic-embed-text")
    assert info.capabilities == ("embedding",)
    assert info.embedding_only is True


def test_parse_show_old_build_without_capabilities_or_pooling_is_completion() -> None:
    body = load_fixture("show-llama.json")
    del body["capabilities"]
    info = parse_show(body, "llama3.1:8b")
    assert info.capabilities == ("completion",)
    assert info.embedding_only is False


def test_parse_show_capabilities_drop_non_strings() -> None:
    body = {"capabilities": ["completion", 3, None, "tools"], "model_info": {}}
    assert parse_show(body, "m").capabilities == ("completion", "tools")


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ("num_ctx 8192", 8192),
        ('num_keep                       24\nnum_ctx                        8192\nstop "<|eot_id|>"', 8192),
        ("temperature 0.7\nnum_ctx 2048", 2048),
        ('stop "num_ctx 4096"', None),
        ("num_ctx_extra 4096", None),
        ("", None),
        (None, None),
        (["num_ctx", 8192], None),
    ],
)
def test_parse_show_num_ctx_from_parameters(parameters: Any, expected: int | None) -> None:
    body = {"parameters": parameters, "model_info": {"general.architecture": "llama"}}
    assert parse_show(body, "m").num_ctx == expected


@pytest.mark.parametrize("model_info", ["absent", None, [], "x"])
def test_parse_show_missing_model_info_is_all_unknown(model_info: object) -> None:
    body: dict[str, Any] = {"parameters": "", "capabilities": ["completion"]}
    if model_info != "absent":
        body["model_info"] = model_info
    info = parse_show(body, "m")
    assert info.architecture == ""
    assert info.capabilities == ("completion",)
    numbers = (
        info.block_count,
        info.embedding_length,
        info.head_count,
        info.head_count_kv,
        info.key_length,
        info.value_length,
        info.context_length,
        info.vocab_size,
        info.num_ctx,
    )
    assert numbers == (None,) * 9


def test_parse_show_vocab_from_verbose_tokens() -> None:
    body = load_fixture("show-gemma4.json")
    body["model_info"]["tokenizer.ggml.tokens"] = ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert parse_show(body, "gemma4").vocab_size == 4


def test_parse_show_does_not_mutate_input() -> None:
    body = load_fixture("show-gemma4.json")
    before = copy.deepcopy(body)
    parse_show(body, "gemma4")
    assert body == before


# --------------------------------------------------------------------------------------------------
# A fake Ollama over real HTTP


@dataclass
class Route:
    status: int = 200
    body: bytes = b"{}"
    content_type: str = "application/json; charset=utf-8"
    delay_s: float = 0.0  # answer only after this long
    hang: bool = False  # never answer (until the test ends)
    hang_mid_body: bool = False  # send headers and part of the body, then hang
    close: bool = False  # close the connection without a response
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers (e.g. Location)


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeOllama:
    """Serves canned bodies per (method, path) and records every request it got."""

    routes: dict[tuple[str, str], Route] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    active: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                with fake._lock:
                    fake.active += 1
                try:
                    self._answer()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (timeout tests)
                finally:
                    with fake._lock:
                        fake.active -= 1

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with fake._lock:
                    fake.received.append(
                        Received(
                            self.command,
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                        )
                    )
                route = fake.routes.get((self.command, self.path))
                if route is None:
                    route = Route(status=404, body=b"404 page not found", content_type="text/plain")
                if route.hang:
                    fake.release.wait(30)
                    return
                if route.close:
                    self.close_connection = True
                    return
                if route.delay_s:
                    fake.release.wait(route.delay_s)
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                self.send_header("Content-Length", str(len(route.body)))
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if route.hang_mid_body:
                    self.wfile.write(route.body[:5])
                    self.wfile.flush()
                    fake.release.wait(30)
                    return
                self.wfile.write(route.body)

            do_GET = _serve
            do_POST = _serve

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # joined by server_close(), so a hanging handler cannot outlive the test
        self.httpd.daemon_threads = False
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def route(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None, **kw: Any) -> None:
        payload = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
        self.routes[(method, path)] = Route(body=payload, **kw)

    def route_fixture(self, method: str, path: str, name: str) -> None:
        self.routes[(method, path)] = Route(body=fixture_bytes(name))

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    fake = FakeOllama()
    yield fake
    fake.stop()
    assert not fake.thread.is_alive()
    assert fake.active == 0, "a handler thread outlived the server"


@pytest.fixture
def make_client() -> Iterator[Callable[..., OllamaClient]]:
    def build(
        url: str, *, timeout_s: float = 5.0, headers: dict[str, str] | None = None, **kw: Any
    ) -> OllamaClient:
        return OllamaClient("gpu1", url, timeout_s=timeout_s, headers=headers, **kw)

    yield from closed_after(build)


@pytest.fixture
def client(ollama: FakeOllama, make_client: Callable[..., OllamaClient]) -> OllamaClient:
    return make_client(ollama.url)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --------------------------------------------------------------------------------------------------
# Happy paths over HTTP


def test_version(ollama: FakeOllama, client: OllamaClient) -> None:
    ollama.route_fixture("GET", "/api/version", "version.json")
    assert client.version() == "0.5.1"
    (req,) = ollama.requests()
    assert (req.method, req.path, req.body) == ("GET", "/api/version", b"")


@pytest.mark.parametrize("body", [{}, {"version": 12}, ["0.5.1"]])
def test_version_wrong_shape(ollama: FakeOllama, client: OllamaClient, body: Any) -> None:
    ollama.route("GET", "/api/version", body)
    with pytest.raises(BadResponse, match="no 'version' string") as info:
        client.version()
    assert info.value.status is NodeStatus.ERROR


def test_ps(ollama: FakeOllama, client: OllamaClient) -> None:
    ollama.route_fixture("GET", "/api/ps", "ps-pinned.json")
    loaded = client.ps()
    assert [m.name for m in loaded] == ["llama3.1:8b", "qwen2.5:32b", "nomic-embed-text:latest"]
    assert [m.processor for m in loaded] == [Processor.GPU, Processor.PARTIAL, Processor.CPU]
    (req,) = ollama.requests()
    assert (req.method, req.path) == ("GET", "/api/ps")


def test_ps_empty(ollama: FakeOllama, client: OllamaClient) -> None:
    ollama.route("GET", "/api/ps", {"models": []})
    assert client.ps() == ()


def test_tags(ollama: FakeOllama, client: OllamaClient) -> None:
    ollama.route_fixture("GET", "/api/tags", "tags-docs.json")
    installed = client.tags()
    assert [(m.name, m.size_bytes) for m in installed] == [
        ("deepseek-r1:latest", 4683075271),
        ("llama3.2:latest", 2019393189),
    ]
    (req,) = ollama.requests()
    assert (req.method, req.path) == ("GET", "/api/tags")


def test_show_sends_the_model_and_parses_the_answer(ollama: FakeOllama, client: OllamaClient) -> None:
    ollama.route_fixture("POST", "/api/show", "show-gemma4.json")
    info = client.show("gemma4:latest")
    assert info.name == "gemma4:latest"
    assert info.block_count == 42
    assert info.key_length == 512
    (req,) = ollama.requests()
    assert (req.method, req.path) == ("POST", "/api/show")
    assert req.json() == {"model": "gemma4:latest"}
    assert req.headers["content-type"] == "application/json"


def test_trailing_slash_in_url(ollama: FakeOllama, make_client: Callable[..., OllamaClient]) -> None:
    ollama.route_fixture("GET", "/api/version", "version.json")
    assert make_client(ollama.url + "/").version() == "0.5.1"
    assert ollama.requests()[0].path == "/api/version"


def test_wrong_shape_over_http_is_bad_response(ollama: FakeOllama, client: OllamaClient) -> None:
    ollama.route("GET", "/api/ps", [{"name": "x"}])
    with pytest.raises(BadResponse, match="expected a JSON object, got list") as info:
        client.ps()
    assert info.value.status is NodeStatus.ERROR
    assert info.value.node == "gpu1"


# --------------------------------------------------------------------------------------------------
# Failures over HTTP


def test_connection_refused_is_down(make_client: Callable[..., OllamaClient]) -> None:
    client = make_client(f"http://127.0.0.1:{closed_port()}", timeout_s=2.0)
    with pytest.raises(NodeUnreachable) as info:
        client.ps()
    err = info.value
    assert err.status is NodeStatus.DOWN
    assert err.node == "gpu1"
    assert "connection refused" in str(err)
    assert "GET /api/ps" in str(err)
    assert isinstance(err, OllamaError)


def test_hang_is_read_timeout(ollama: FakeOllama, make_client: Callable[..., OllamaClient]) -> None:
    ollama.routes[("GET", "/api/ps")] = Route(hang=True)
    client = make_client(ollama.url, timeout_s=0.3)
    with pytest.raises(NodeUnreachable) as info:
        client.ps()
    assert info.value.status is NodeStatus.DOWN
    assert "timed out after 0.3s waiting for the response headers" in str(info.value)
    assert len(ollama.requests()) == 1  # no silent retry


def test_hang_mid_body_is_down(ollama: FakeOllama, make_client: Callable[..., OllamaClient]) -> None:
    ollama.routes[("GET", "/api/ps")] = Route(body=fixture_bytes("ps-docs.json"), hang_mid_body=True)
    client = make_client(ollama.url, timeout_s=0.3)
    with pytest.raises(NodeUnreachable) as info:
        client.ps()
    assert info.value.status is NodeStatus.DOWN


def test_hang_mid_body_says_timed_out(ollama: FakeOllama, make_client: Callable[..., OllamaClient]) -> None:
    ollama.routes[("GET", "/api/ps")] = Route(body=fixture_bytes("ps-docs.json"), hang_mid_body=True)
    client = make_client(ollama.url, timeout_s=0.3)
    with pytest.raises(NodeUnreachable, match="timed out"):
        client.ps()


def test_connection_closed_without_response_is_down(ollama: FakeOllama, client: OllamaClient) -> None:
    ollama.routes[("GET", "/api/ps")] = Route(close=True)
    with pytest.raises(NodeUnreachable, match="connection closed without a response") as info:
        client.ps()
    assert info.value.status is NodeStatus.DOWN


def test_http_500_is_api_error(ollama: FakeOllama, client: OllamaClient) -> None:
    text = "llama runner process has terminated: exit status 2"
    ollama.route("POST", "/api/generate", {"error": text}, status=500)
    with pytest.raises(ApiError) as info:
        client.load("llama3.2", embedding=False, timeout_s=5.0)
    err = info.value
    assert err.status_code == 500
    assert err.status is NodeStatus.ERROR
    assert text in str(err)
    assert text in err.error
    assert "HTTP 500" in str(err)


def test_http_503_server_busy(ollama: FakeOllama, client: OllamaClient) -> None:
    text = "server busy, please try again.  maximum pending requests exceeded"
    ollama.route("GET", "/api/ps", {"error": text}, status=503)
    with pytest.raises(ApiError) as info:
        client.ps()
    assert info.value.status_code == 503
    assert text in str(info.value)


def test_http_500_with_text_body(ollama: FakeOllama, client: OllamaClient) -> None:
    ollama.route("GET", "/api/tags", raw=b"Internal Server Error\n", status=500, content_type="text/plain")
    with pytest.raises(ApiError, match="Internal Server Error") as info:
        client.tags()
    assert info.value.status_code == 500


def test_show_unknown_model_is_404(ollama: FakeOllama, client: OllamaClient) -> None:
    ollama.route("POST", "/api/show", {"error": "model 'x' not found"}, status=404)
    with pytest.raises(ApiError) as info:
        client.show("x")
    err = info.value
    assert err.status_code == 404
    assert "model 'x' not found" in str(err)
    assert err.status is NodeStatus.ERROR


def test_unknown_route_is_404(ollama: FakeOllama, client: OllamaClient) -> None:
    # an old build, or something that is not Ollama, answering gin's plain 404
    with pytest.raises(ApiError, match="404 page not found") as info:
        client.version()
    assert info.value.status_code == 404


@pytest.mark.parametrize(
    "raw", [b"{not json", b"<html><body>Bad Gateway</body></html>", b"", b'{"models": [}']
)
def test_invalid_json_is_bad_response(ollama: FakeOllama, client: OllamaClient, raw: bytes) -> None:
    ollama.route("GET", "/api/ps", raw=raw)
    with pytest.raises(BadResponse, match="invalid JSON") as info:
        client.ps()
    assert info.value.status is NodeStatus.ERROR
    assert "GET /api/ps" in str(info.value)


# --------------------------------------------------------------------------------------------------
# Headers


def test_headers_are_sent_on_every_request(
    ollama: FakeOllama, make_client: Callable[..., OllamaClient]
) -> None:
    ollama.route_fixture("GET", "/api/version", "version.json")
    ollama.route_fixture("GET", "/api/ps", "ps-docs.json")
    ollama.route_fixture("GET", "/api/tags", "tags-docs.json")
    ollama.route_fixture("POST", "/api/show", "show-llama.json")
    ollama.route_fixture("POST", "/api/generate", "generate-load.json")
    ollama.route_fixture("POST", "/api/embed", "embed-load.json")
    client = make_client(ollama.url, headers={"Authorization": SECRET, "X-Cluster": "lab"})
    client.version()
    client.ps()
    client.tags()
    client.show("llama3.1:8b")
    client.load("llama3.1:8b", embedding=False, timeout_s=5.0)
    client.load("nomic-embed-text", embedding=True, timeout_s=5.0)
    client.unload("llama3.1:8b")
    received = ollama.requests()
    assert len(received) == 7
    for req in received:
        assert req.headers.get("authorization") == SECRET, req.path
        assert req.headers.get("x-cluster") == "lab", req.path


def test_headers_never_appear_in_errors_or_logs(
    ollama: FakeOllama, make_client: Callable[..., OllamaClient], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    headers = {"Authorization": SECRET}
    ollama.routes[("GET", "/api/ps")] = Route(hang=True)
    ollama.route("GET", "/api/tags", {"error": "boom"}, status=500)
    ollama.route("POST", "/api/show", {"error": "model 'x' not found"}, status=404)
    ollama.route("GET", "/api/version", raw=b"{oops")
    fast = make_client(ollama.url, timeout_s=0.3, headers=headers)
    refused = make_client(f"http://127.0.0.1:{closed_port()}", timeout_s=1.0, headers=headers)
    errors: list[OllamaError] = []
    for call in (fast.ps, fast.tags, lambda: fast.show("x"), fast.version, refused.version):
        with pytest.raises(OllamaError) as info:
            call()
        errors.append(info.value)
    assert [type(e) for e in errors] == [NodeUnreachable, ApiError, ApiError, BadResponse, NodeUnreachable]
    for err in errors:
        for text in (str(err), repr(err), err.message, *map(str, err.args)):
            assert "s3cr3t" not in text
            assert "Authorization" not in text
        assert err.__cause__ is None
    assert "s3cr3t" not in caplog.text
    assert len(ollama.requests()) == 4
    assert all(r.headers.get("authorization") == SECRET for r in ollama.requests())


# --------------------------------------------------------------------------------------------------
# load / unload


def _only_body(ollama: FakeOllama, method: str, path: str) -> Any:
    (req,) = ollama.requests()
    assert (req.method, req.path) == (method, path)
    assert req.headers["content-type"] == "application/json"
    return req.json()


def test_load_completion_model_posts_generate(ollama: FakeOllama, client: OllamaClient) -> None:
    ollama.route_fixture("POST", "/api/generate", "generate-load.json")
    client.load("llama3.2", embedding=False, timeout_s=5.0)
    body = _only_body(ollama, "POST", "/api/generate")
    assert body == {"model": "llama3.2", "keep_alive": -1}
    assert type(body["keep_alive"]) is int  # a JSON number; the string "-1" is a 400 in Ollama
    assert "options" not in body


def test_load_embedding_model_posts_embed(ollama: FakeOllama, client: OllamaClient) -> None:
    ollama.route_fixture("POST", "/api/embed", "embed-load.json")
    client.load("nomic-embed-text", embedding=True, timeout_s=5.0)
    body = _only_body(ollama, "POST", "/api/embed")
    assert body == {"model": "nomic-embed-text", "keep_alive": -1}
    assert type(body["keep_alive"]) is int
    assert "options" not in body
    assert "input" not in body


def test_unload_posts_keep_alive_zero(ollama: FakeOllama, client: OllamaClient) -> None:
    ollama.route_fixture("POST", "/api/generate", "generate-unload.json")
    client.unload("llama3.2")
    body = _only_body(ollama, "POST", "/api/generate")
    assert body == {"model": "llama3.2", "keep_alive": 0}
    assert type(body["keep_alive"]) is int


def test_load_of_embedding_model_via_generate_is_api_error(ollama: FakeOllama, client: OllamaClient) -> None:
    text = '"nomic-embed-text" does not support generate'
    ollama.route("POST", "/api/generate", {"error": text}, status=400)
    with pytest.raises(ApiError) as info:
        client.load("nomic-embed-text", embedding=False, timeout_s=5.0)
    assert info.value.status_code == 400
    assert text in str(info.value)


def test_load_uses_its_own_read_timeout(ollama: FakeOllama, make_client: Callable[..., OllamaClient]) -> None:
    ollama.routes[("POST", "/api/generate")] = Route(body=fixture_bytes("generate-load.json"), delay_s=0.5)
    ollama.routes[("GET", "/api/ps")] = Route(body=fixture_bytes("ps-docs.json"), delay_s=0.5)
    client = make_client(ollama.url, timeout_s=0.2)
    # the same delay is a timeout for an ordinary call...
    with pytest.raises(NodeUnreachable, match=r"timed out after 0\.2s waiting for the response headers"):
        client.ps()
    # ...but not for a load, which waits for the runner to come up
    client.load("llama3.2", embedding=False, timeout_s=2.0)
    assert [r.path for r in ollama.requests()] == ["/api/ps", "/api/generate"]


def test_load_timeout_is_reported_with_the_load_timeout(
    ollama: FakeOllama, make_client: Callable[..., OllamaClient]
) -> None:
    ollama.routes[("POST", "/api/embed")] = Route(hang=True)
    client = make_client(ollama.url, timeout_s=5.0)
    with pytest.raises(
        NodeUnreachable, match=r"POST /api/embed: timed out after 0\.3s waiting for the response headers"
    ) as info:
        client.load("nomic-embed-text", embedding=True, timeout_s=0.3)
    assert info.value.status is NodeStatus.DOWN


def test_load_sends_options_only_when_given(ollama: FakeOllama, client: OllamaClient) -> None:
    ollama.route_fixture("POST", "/api/generate", "generate-load.json")
    client.load("llama3.2", embedding=False, timeout_s=5.0, options={"num_ctx": 8192})
    assert _only_body(ollama, "POST", "/api/generate") == {
        "model": "llama3.2",
        "keep_alive": -1,
        "options": {"num_ctx": 8192},
    }


# --------------------------------------------------------------------------------------------------
# Hostile answers: each is the node's error, never an exception of another kind


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"[" * 200_000, "nested too deep"),
        (b'{"version": "0.5.\xff"}', "not UTF-8 at byte 17"),
        (b'{"version": ' + b"9" * 5000 + b"}", "invalid JSON"),
        (b"\xef\xbb\xbf" + b'{"version": "0.5.1"}', "invalid JSON"),  # a BOM is not JSON
    ],
)
def test_undecodable_bodies_are_bad_responses(
    ollama: FakeOllama, client: OllamaClient, raw: bytes, needle: str
) -> None:
    ollama.route("GET", "/api/version", raw=raw)
    with pytest.raises(BadResponse, match=needle) as info:
        client.version()
    assert info.value.status is NodeStatus.ERROR
    assert "\n" not in str(info.value)


def test_body_over_the_cap_is_bad_response(
    ollama: FakeOllama, make_client: Callable[..., OllamaClient]
) -> None:
    ollama.route("GET", "/api/tags", {"models": [{"name": "x" * 100, "size": 1}] * 50})
    client = make_client(ollama.url, max_body_bytes=1000)
    with pytest.raises(
        BadResponse, match=r"GET /api/tags: response body of \d+ bytes is over the 1000 bytes cap"
    ):
        client.tags()


def test_redirect_is_bad_response_and_not_followed(
    ollama: FakeOllama, make_client: Callable[..., OllamaClient]
) -> None:
    elsewhere = FakeOllama()
    try:
        target = f"{elsewhere.url}/api/show"
        ollama.routes[("POST", "/api/show")] = Route(
            status=307, body=b"", headers={"Location": target + "?t=1"}
        )
        client = make_client(ollama.url, headers={"X-Api-Key": SECRET})
        with pytest.raises(BadResponse) as info:
            client.show("llama3.2")
        assert str(info.value) == f"gpu1: POST /api/show: redirect refused: HTTP 307 to {target}"
        assert info.value.status is NodeStatus.ERROR
        assert elsewhere.requests() == []
    finally:
        elsewhere.stop()


def test_absurd_version_string_is_bad_response(ollama: FakeOllama, client: OllamaClient) -> None:
    ollama.route("GET", "/api/version", {"version": "9" * 10_000})
    with pytest.raises(BadResponse, match="a version string of 10000 characters"):
        client.version()


def test_exception_inside_a_parser_is_bad_response(
    ollama: FakeOllama, client: OllamaClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever a parser raises on a body it did not expect is that node's bad answer, not a crash.
    import gpu_router.ollama as module

    def broken(body: object, model: str, node: str = "node") -> object:
        return int("1" * 5000)  # ValueError past Python's 4300-digit limit

    monkeypatch.setattr(module, "parse_show", broken)
    ollama.route("POST", "/api/show", {"model_info": {}})
    with pytest.raises(BadResponse, match=r"/api/show llama3\.2: cannot use the response \(ValueError\)"):
        client.show("llama3.2")


def test_header_value_outside_latin1_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="'Authorization'") as info:
        OllamaClient("gpu1", "http://127.0.0.1:1", timeout_s=1.0, headers={"Authorization": "Bearer тoken"})
    assert "тoken" not in str(info.value)


def test_https_node_verifies_its_certificate() -> None:
    server = RawServer(
        serve_requests(lambda req: response(body=b'{"version":"0.12.6"}')), tls=server_tls_context()
    )
    try:
        unverified = OllamaClient("gpu1", server.url, timeout_s=5.0)
        with pytest.raises(BadResponse, match="TLS certificate verify failed") as info:
            unverified.version()
        assert info.value.status is NodeStatus.ERROR
        verified = OllamaClient("gpu1", server.url, timeout_s=5.0, ca_file=CA_FILE)
        assert verified.version() == "0.12.6"
        for c in (unverified, verified):
            c.close()
    finally:
        server.close()
