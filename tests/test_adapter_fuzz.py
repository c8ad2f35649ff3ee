"""Generated garbage served over a real loopback socket never raises out of the adapters.

``OllamaClient`` may only raise its own typed errors (``OllamaError`` subclasses), whatever
``/api/ps``, ``/api/tags``, ``/api/show`` or ``/api/version`` answer (deep nesting included);
``ExporterSource.read()`` always returns a ``GpuReading``, whatever NVIDIA's or AMD's exporters
send. Example counts are kept modest so the default run stays fast.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawserver import RawServer, Request, response, serve_requests

from gpu_router.gpus.exporter import ExporterSource
from gpu_router.ollama import OllamaClient, OllamaError
from gpu_router.state import GpuReading, InstalledModel, LoadedModel, ModelInfo, VramSource

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Canned:
    """What the server answers next; set by each example."""

    status: int = 200
    body: bytes = b"{}"
    content_type: str = "application/json"


class Fixture:
    def __init__(self) -> None:
        self.canned = Canned()
        self.lock = threading.Lock()
        self.server = RawServer(serve_requests(self.answer))

    def answer(self, req: Request) -> bytes:
        with self.lock:
            c = self.canned
        return response(c.status, c.body, reason="X", headers={"Content-Type": c.content_type})

    def set(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        with self.lock:
            self.canned = Canned(status, body, content_type)


@pytest.fixture(scope="module")
def fixture() -> Iterator[Fixture]:
    f = Fixture()
    yield f
    f.server.close()


@pytest.fixture(scope="module")
def client(fixture: Fixture) -> Iterator[OllamaClient]:
    c = OllamaClient("fuzz", fixture.server.url, timeout_s=5.0)
    yield c
    c.close()


# -- strategies ----------------------------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["", "0", "-1", "2024-06-04T14:38:31.83753-07:00", "0001-01-01T00:00:00Z", "sha256:"])
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)


def _entry(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """An object with some of ``keys`` (the real field names), each holding any JSON value."""
    return st.dictionaries(st.sampled_from(keys), json_values, max_size=len(keys))


_PS_KEYS = ["name", "model", "size", "size_vram", "digest", "expires_at", "context_length", "details"]
_TAGS_KEYS = ["name", "model", "size", "digest", "modified_at", "details"]
_ARCH = ["llama", "gemma3", "qwen2", "nomic-bert", "", "x"]
_INFO_SUFFIXES = [
    "block_count",
    "embedding_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "context_length",
    "vocab_size",
    "pooling_type",
]

ps_bodies = st.fixed_dictionaries({"models": st.lists(_entry(_PS_KEYS), max_size=4) | json_values})
tags_bodies = st.fixed_dictionaries({"models": st.lists(_entry(_TAGS_KEYS), max_size=4) | json_values})


@st.composite
def show_bodies(draw: st.DrawFn) -> Any:
    arch = draw(st.sampled_from(_ARCH))
    info: dict[str, Any] = {"general.architecture": draw(st.sampled_from([arch, 7, None]))}
    for suffix in draw(st.lists(st.sampled_from(_INFO_SUFFIXES), max_size=6)):
        info[f"{arch}.{suffix}"] = draw(json_values)
    if draw(st.booleans()):
        info["tokenizer.ggml.tokens"] = draw(json_values)
    body: dict[str, Any] = {"model_info": draw(st.sampled_from([info, None, [], "x"]))}
    body["capabilities"] = draw(json_values)
    body["parameters"] = draw(
        st.sampled_from(["num_ctx 8192", "num_ctx " + "9" * 5000, "num_ctx -1"]) | st.text(max_size=60)
    )
    return body


def _encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


# Bytes that are not valid JSON (or not valid UTF-8), deep nesting, and numbers past every limit.
raw_bodies = (
    st.binary(max_size=200)
    | st.integers(1, 100_000).map(lambda n: b"[" * n)
    | st.integers(1, 50_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n)
    | st.integers(4000, 6000).map(lambda n: b'{"models": [{"size": ' + b"7" * n + b"}]}")
    | st.sampled_from([b"", b"null", b"NaN", b"1e999", b"-0", b'"\\ud800"', b"\xef\xbb\xbf{}"])
)


def _body_for(endpoint_bodies: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    # mostly the endpoint's own shape with odd values in it: that is where a parser meets surprises
    shaped = endpoint_bodies.map(_encode)
    return st.one_of(shaped, shaped, shaped, json_values.map(_encode), raw_bodies)


statuses = st.sampled_from([200] * 6 + [201, 400, 404, 500, 503])


def _only_typed_errors(call: Any) -> Any:
    """What ``call()`` returns, or the OllamaError it raised; any other exception fails the test."""
    try:
        return call()
    except OllamaError as exc:
        error = exc
    assert error.node == "fuzz"
    assert "\n" not in str(error)
    return error


# -- Ollama --------------------------------------------------------------------------------------------------


@FUZZ
@given(status=statuses, body=_body_for(ps_bodies))
def test_ps_never_raises_anything_else(
    fixture: Fixture, client: OllamaClient, status: int, body: bytes
) -> None:
    fixture.set(status, body)
    got = _only_typed_errors(client.ps)
    if not isinstance(got, OllamaError):
        assert isinstance(got, tuple)
        assert all(isinstance(m, LoadedModel) for m in got)


@FUZZ
@given(status=statuses, body=_body_for(tags_bodies))
def test_tags_never_raises_anything_else(
    fixture: Fixture, client: OllamaClient, status: int, body: bytes
) -> None:
    fixture.set(status, body)
    got = _only_typed_errors(client.tags)
    if not isinstance(got, OllamaError):
        assert all(isinstance(m, InstalledModel) for m in got)


@FUZZ
@given(status=statuses, body=_body_for(show_bodies()))
def test_show_never_raises_anything_else(
    fixture: Fixture, client: OllamaClient, status: int, body: bytes
) -> None:
    fixture.set(status, body)
    got = _only_typed_errors(lambda: client.show("m"))
    if not isinstance(got, OllamaError):
        assert isinstance(got, ModelInfo)
        assert got.name == "m"


@FUZZ
@given(
    status=statuses,
    body=_body_for(
        st.fixed_dictionaries({"version": json_values}) | st.fixed_dictionaries({"version": st.text()})
    ),
)
def test_version_never_raises_anything_else(
    fixture: Fixture, client: OllamaClient, status: int, body: bytes
) -> None:
    fixture.set(status, body)
    got = _only_typed_errors(client.version)
    if not isinstance(got, OllamaError):
        assert isinstance(got, str)
        assert status < 400


# -- exporters -----------------------------------------------------------------------------------------------

_FAMILIES = [
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_TOTAL",
    "DCGM_FI_DEV_FB_RESERVED",
    "DCGM_FI_DEV_FB_CAPACITY_BYTES",
    "nvidia_smi_memory_total_bytes",
    "nvidia_smi_memory_used_bytes",
    "nvidia_smi_memory_free_bytes",
    "nvidia_smi_gpu_info",
    "nvidia_smi_index",
    # ROCm device-metrics-exporter and omnistat (AMD)
    "gpu_total_vram",
    "gpu_used_vram",
    "gpu_free_vram",
    "gpu_gfx_activity",
    "gpu_health",
    "gpu_junction_temperature",
    "amd_gpu_total_vram",
    "rocm_vram_total_bytes",
    "rocm_vram_used_percentage",
    "rocm_utilization_percentage",
    "rocm_version_info",
    "garbage_metric",
]
_LABELS = [
    "gpu",
    "UUID",
    "uuid",
    "device",
    "modelName",
    "GPU_I_ID",
    "index",
    "name",
    "gpu_id",
    "gpu_uuid",
    "card",
    "hostname",
]
_label_values = st.text(max_size=8) | st.sampled_from(["0", "1", "nvidia0", "²", "nvidia²", "9" * 5000, ""])
_values = st.sampled_from(
    ["0", "1e10", "NaN", "+Inf", "-1", "9223372036854775794", "1e400", "x"]
) | st.floats().map(repr)


@st.composite
def prom_lines(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(_FAMILIES))
    labels = draw(st.dictionaries(st.sampled_from(_LABELS), _label_values, max_size=4))
    text = ",".join(f'{k}="{v.replace(chr(92), "").replace(chr(34), "")}"' for k, v in labels.items())
    return f"{name}{{{text}}} {draw(_values)}"


exporter_bodies = (
    st.lists(prom_lines(), max_size=12).map(lambda lines: "\n".join(lines).encode())
    | st.binary(max_size=300)
    | st.text(max_size=300).map(str.encode)
    # One enormous line, labels nested in braces, or JSON where text belongs: none may escape.
    | st.integers(1, 200_000).map(lambda n: b"DCGM_FI_DEV_FB_FREE{gpu=\"0\"} " + b"9" * n)
    | st.integers(1, 50_000).map(lambda n: b"gpu_total_vram" + b"{" * n + b"} 1")
    | st.integers(1, 100_000).map(lambda n: b"[" * n)
)


@FUZZ
@given(status=st.sampled_from([200, 200, 200, 500]), body=exporter_bodies)
def test_exporter_read_always_returns_a_reading(fixture: Fixture, status: int, body: bytes) -> None:
    fixture.set(status, body, "text/plain; version=0.0.4")
    source = ExporterSource(fixture.server.url + "/metrics", 5.0)
    try:
        reading = source.read()
    finally:
        source.close()
    assert isinstance(reading, GpuReading)
    if reading.source is VramSource.UNKNOWN:
        assert reading.error
        assert reading.gpus == ()
    else:
        assert reading.gpus
