"""Generated configs give a valid Config or one ``file:line: key: message`` error, never a traceback.

Documents are built from the config's real keys (every top-level setting, the node and priority
model keys, GPU specs, headers with ``${VAR}``, ``ollama_env``) holding values of every YAML kind,
plus random text and random bytes. Through ``main --check-config`` the answer is exit 0 or 78.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from gpu_router import config as cfg
from gpu_router import systemd
from gpu_router.cli import main
from gpu_router.config import EX_CONFIG, Config, ConfigError, load_config

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ENV = {"TOKEN": "t0ken-0123456789abcdef", "EMPTY": "", "ODD": "caf\u00e9 \u2192 x", "NEWLINE": "a\nb"}

# -- values of every kind, and the ones the keys expect ---------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "",
            "0",
            "-1",
            "30s",
            "5m",
            "1h30m",
            "0.5s",
            "10ms",
            "1e9h",
            "s",
            "all",
            "auto",
            "none",
            "nvml",
            "amd",
            "idle",
            "any",
            "never",
            "DEBUG",
            "info",
            "127.0.0.1:9464",
            "0.0.0.0:80",
            "[::1]:9464",
            ":9464",
            "${TOKEN}",
            "${NOPE}",
            "${ODD}",
            "${NEWLINE}",
            "${",
            "/var/lib/x",
            "relative/dir",
            "http://10.0.0.1:11434",
            "https://gpu-a:11434/prefix",
            "htp://x",
            "http://user:pw@h:1",
            "http://h:99999",
            "llama3.2",
            "qwen2.5:7b",
            "\x00",
            "\u2028",
        ]
    )
)
values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
urls = st.sampled_from(
    ["http://127.0.0.1:11434", "http://gpu-a:11434", "https://gpu-b:443", "http://[::1]:1", "ftp://x", ""]
) | st.text(max_size=30)
_vram = st.integers(-5, 10**7) | st.lists(st.integers(-5, 10**6), max_size=4)
gpu_specs = (
    st.sampled_from(["auto", "nvml", "amd", "none", "static", 0, None])
    | st.fixed_dictionaries({"exporter": urls})
    | st.fixed_dictionaries({"vram_mb": _vram})
    | st.dictionaries(st.sampled_from(["exporter", "vram_mb", "kind", "x"]), values, max_size=3)
)
_header_names = st.sampled_from(["Authorization", "X-Api-Key", "Bad Name", "", "Content-Length", "x"])
_header_values = st.sampled_from(
    ["Bearer ${TOKEN}", "${EMPTY}", "${ODD}", "${NEWLINE}", "${NOPE}", "plain", "tök"]
)
headers = st.dictionaries(_header_names | st.text(max_size=10), _header_values | values, max_size=3)
ollama_env = st.dictionaries(
    st.sampled_from(
        [
            "OLLAMA_CONTEXT_LENGTH",
            "OLLAMA_NUM_PARALLEL",
            "OLLAMA_KV_CACHE_TYPE",
            "OLLAMA_FLASH_ATTENTION",
            "OLLAMA_GPU_OVERHEAD",
            "OLLAMA_MAX_LOADED_MODELS",
            "OLLAMA_SCHED_SPREAD",
            "OLLAMA_KEEP_ALIVE",
            "OLLAMA_UNKNOWN",
            "NOT_OLLAMA",
            "ollama_lower",
        ]
    ),
    values | st.sampled_from(["q8_0", "q4_0", "f16", "1", "true", "8192", "-1"]),
    max_size=4,
)


@st.composite
def node_entries(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 4)) == 0:
        return draw(urls | values)
    keys = draw(st.lists(st.sampled_from([*cfg._NODE_KEYS, "gpus", "tls"]), max_size=6, unique=True))
    entry: dict[str, Any] = {"url": draw(urls)} if draw(st.booleans()) else {}
    for key in keys:
        entry[key] = draw(
            {
                "url": urls,
                "gpu": gpu_specs,
                "headers": headers,
                "ollama_env": ollama_env,
                "name": st.text(max_size=10) | values,
            }.get(key, values)
        )
    return entry


@st.composite
def model_entries(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(["llama3.2", "qwen2.5:7b", "", "a b"]) | values)
    keys = draw(st.lists(st.sampled_from([*cfg._MODEL_KEYS, "replica"]), max_size=5, unique=True))
    entry: dict[str, Any] = {}
    for key in keys:
        entry[key] = draw(
            {
                "replicas": st.sampled_from(["all", 0, 1, 2, 99, -1, "2"]) | values,
                "nodes": st.lists(st.sampled_from(["gpu-a", "127.0.0.1:11434", "nope"]), max_size=3) | values,
                "num_ctx": st.integers(-1, 2**40) | values,
            }.get(key, values)
        )
    return entry


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """A config-shaped document: mostly real keys, each holding a plausible or any value."""
    top = [*cfg._SETTINGS, "nodes", "priority_models", "ollama_env", *cfg._REMOVED_KEYS, "nodez", "x"]
    doc: dict[str, Any] = {}
    if draw(st.integers(0, 9)) > 0:
        doc["nodes"] = draw(st.lists(node_entries(), max_size=4) | values)
    for key in draw(st.lists(st.sampled_from(top), max_size=8, unique=True)):
        if key == "nodes":
            continue
        if key == "priority_models":
            doc[key] = draw(st.lists(model_entries(), max_size=4) | values)
        elif key == "ollama_env":
            doc[key] = draw(ollama_env | values)
        else:
            doc[key] = draw(_scalars | values)
    if draw(st.integers(0, 4)) == 0:
        return draw(values)  # not even a mapping at the top
    return doc


# A valid value for every top-level setting: a document starts valid and a few parts are then
# broken, so the checks deep inside (every reader, every cross-check) are reached, not only the first.
_VALID: dict[str, Any] = {
    "check_interval": "5m",
    "watch_interval": 10,
    "request_timeout": "5s",
    "load_timeout": 300,
    "pull_timeout": "1h",
    "vram_safety_margin": 0.8,
    "vram_reserve_mb": 512,
    "auto_optimize": True,
    "cpu_fallback": False,
    "pull_missing": False,
    "max_concurrent_pulls": 1,
    "down_after": 2,
    "evict": "idle",
    "log_level": "INFO",
    "state_dir": "/var/lib/gpu-router",
    "listen": "127.0.0.1:9464",
    "api_token": "${TOKEN}",
}


def _valid_document() -> dict[str, Any]:
    doc: dict[str, Any] = {
        "nodes": [
            {
                "name": "gpu-a",
                "url": "http://127.0.0.1:11434",
                "gpu": {"vram_mb": [8192, 8192]},
                "headers": {"Authorization": "Bearer ${TOKEN}"},
                "ollama_env": {"OLLAMA_NUM_PARALLEL": 1},
            },
            {"name": "gpu-b", "url": "https://10.0.0.2:11434", "gpu": {"exporter": "http://10.0.0.2:9400/metrics"}},
            "http://10.0.0.3:11434",
        ],
        "priority_models": [
            "llama3.2",
            {"name": "qwen2.5:7b", "replicas": 1, "nodes": ["gpu-a", "gpu-b"], "num_ctx": 8192},
        ],
        "ollama_env": {"OLLAMA_CONTEXT_LENGTH": 8192, "OLLAMA_KV_CACHE_TYPE": "q8_0"},
    }
    doc.update({k: _VALID.get(k, "x") for k in cfg._SETTINGS})
    return doc


@st.composite
def broken_documents(draw: st.DrawFn) -> Any:
    """A valid document with one to three parts replaced by generated values, or removed."""
    doc = _valid_document()
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(["top", "node", "model", "env"]))
        if where == "top":
            key = draw(st.sampled_from([*doc, *cfg._REMOVED_KEYS, "nodez"]))
            target: dict[str, Any] = doc
        elif where == "node":
            target = _part(doc, "nodes", draw(st.integers(0, 1)))
            key = draw(st.sampled_from([*cfg._NODE_KEYS, "gpus"]))
        elif where == "model":
            target = _part(doc, "priority_models", 1)
            key = draw(st.sampled_from([*cfg._MODEL_KEYS, "replica"]))
        else:
            target = _part(doc, "ollama_env", None)
            key = draw(ollama_env.map(lambda d: next(iter(d), "OLLAMA_NUM_PARALLEL")))
        if draw(st.integers(0, 5)) == 0:
            target.pop(key, None)
            continue
        strategy = {
            "nodes": st.lists(node_entries(), max_size=3),
            "priority_models": st.lists(model_entries(), max_size=3),
            "ollama_env": ollama_env,
            "gpu": gpu_specs,
            "headers": headers,
            "url": urls,
            "replicas": st.sampled_from(["all", 0, 3, -1, "2", 2.5]),
        }.get(key, _scalars)
        target[key] = draw(strategy | values)
    return doc


def _part(doc: dict[str, Any], key: str, index: int | None) -> dict[str, Any]:
    """``doc[key]`` (or its item ``index``) when an earlier change left it a mapping, else a scratch one."""
    value = doc.get(key)
    if index is not None:
        value = value[index] if isinstance(value, list) and len(value) > index else None
    return value if isinstance(value, dict) else {}


def _dump(doc: Any, flow: bool) -> str:
    return yaml.safe_dump(doc, default_flow_style=flow, allow_unicode=True, sort_keys=False)


def lf_lines(text: str) -> int:
    """Line breaks as editors, grep and sed count them, as error lines do: LF only.

    YAML also breaks lines at a lone CR, NEL, LS and PS; the error line must not count those.
    """
    return text.count("\n")


def _check(path: Path, text_lines: int) -> Config | None:
    """load_config's answer, asserting that any error is one well-formed line naming file and line."""
    error: ConfigError | None = None
    try:
        got = load_config(path, environ=ENV)
    except ConfigError as exc:
        error = exc
    if error is None:
        event("valid")
        return got
    message = str(error)
    event(f"error at {error.key.split('[')[0].split('.')[0] or 'top level'}")
    assert message.startswith(str(path)), message
    assert "\n" not in message, repr(message)
    assert "\r" not in message, repr(message)
    assert "t0ken" not in message, "a header value was printed"
    if error.line is not None:
        assert message.startswith(f"{path}:{error.line}: ")
        # +2: YAML marks the end of an empty document on the line after the file's last.
        assert 1 <= error.line <= text_lines + 2, (error.line, text_lines)
    assert error.message
    return None


# -- the properties ----------------------------------------------------------------------------------------


@FUZZ
@given(doc=broken_documents() | documents(), flow=st.booleans())
# Found by this test: a key with a line break in it split the error over two lines.
@example(doc={"nodes": [{"\r": None}]}, flow=False)
@example(doc={"nodes": ["http://h:1"], "log_level\n": 1}, flow=True)
def test_a_generated_config_is_valid_or_one_located_error(tmp_path: Path, doc: Any, flow: bool) -> None:
    path = tmp_path / "config.yaml"
    text = _dump(doc, flow)
    path.write_text(text, encoding="utf-8")
    got = _check(path, lf_lines(text))
    if got is not None:
        assert got.nodes, "a valid config has at least one node"
        assert got.request_timeout_s > 0
        assert 0 < got.vram_safety_margin <= 1
        names = [n.name for n in got.nodes]
        assert len(names) == len(set(names)), "node names must be unique"


# Text that looks like YAML, with the keys in it: anchors, tags, merges, tabs, odd indentation.
_yaml_bits = st.sampled_from(
    [
        "nodes:",
        "  - http://127.0.0.1:11434",
        "  - url: http://h:1",
        "    headers: {Authorization: ${TOKEN}}",
        "priority_models: [llama3.2",
        "check_interval: 5m",
        "<<: *a",
        "base: &a {evict: any}",
        "!!python/object:os.system {}",
        "!!binary aGVsbG8=",
        "\t- x",
        "---",
        "...",
        "? complex key",
        ": value",
        "state_dir: !!str 1",
        "ollama_env: {OLLAMA_NUM_PARALLEL: 4}",
        '"quoted: key": 1',
        "%YAML 1.1",
        "& bad anchor",
        "*undefined",
        "nodes: &n [http://a:1]",
        "x: *n",
    ]
)
texts = st.lists(_yaml_bits | st.text(max_size=30), max_size=12).map("\n".join) | st.text(max_size=300)


@FUZZ
@given(text=texts)
@example(text="\r\x850")  # CR and NEL break lines for YAML (its line 3), not for sed: line 1
@example(text="a: 1\r\n\u2028b: [")
def test_random_text_is_valid_or_one_located_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _check(path, lf_lines(text))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_random_bytes_are_valid_or_one_located_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(data)
    _check(path, lf_lines(data.decode("utf-8", errors="replace")))


@pytest.fixture
def own_logging() -> Iterator[None]:
    """main() points the gpu_router log handler at this test's captured stderr: put it back after."""
    logger = logging.getLogger("gpu_router")
    handlers, level, installed = list(logger.handlers), logger.level, systemd._handler
    yield
    for h in logger.handlers:
        if h not in handlers:
            logger.removeHandler(h)
    for h in handlers:
        logger.addHandler(h)
    logger.setLevel(level)
    systemd._handler = installed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=broken_documents() | documents())
def test_main_check_config_exits_0_or_78_with_the_message(
    tmp_path: Path, doc: Any, capsys: pytest.CaptureFixture[str], own_logging: None
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(_dump(doc, False), encoding="utf-8")
    out = io.StringIO()
    rc = main(["--config", str(path), "--check-config"], out=out)
    err = capsys.readouterr().err
    assert rc in (0, EX_CONFIG), (rc, err)
    assert "Traceback" not in err
    if rc == 0:
        assert out.getvalue().startswith(f"{path}: OK (")
    else:
        assert re.match(rf"^gpu-router: {re.escape(str(path))}(:\d+)?: ", err), err
        assert err.count("\n") == 1, err
