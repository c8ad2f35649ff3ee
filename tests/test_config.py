"""Tests for gpu_router.config: YAML -> Config, error messages with file:line: key, config discovery."""

from __future__ import annotations

import os
import pathlib
import pickle
import re
import textwrap
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_router.config import (
    DEFAULT_CONFIG_PATH,
    EX_CONFIG,
    Config,
    ConfigError,
    ConfigNotFound,
    GpuSpec,
    NodeConfig,
    PriorityModel,
    default_state_dir,
    find_config_path,
    load_config,
    normalize_model_name,
    parse_config,
    parse_duration,
)

MIB = 1024 * 1024
REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "config.yaml"
SECRET = "s3cr3t-t0ken-value"
ENV = {"OLLAMA_TOKEN": SECRET}


def parse(text: str, environ: dict[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), "config.yaml", environ=ENV if environ is None else environ)


def error(text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, environ)
    return info.value


# --------------------------------------------------------------------------- good files


def test_simple_form() -> None:
    config = parse("nodes: [http://localhost:11434]\n")
    assert config == Config(
        nodes=(NodeConfig(name="localhost:11434", url="http://localhost:11434"),),
        path="config.yaml",
    )


RICH = """\
nodes:
  - http://localhost:11434
  - url: http://10.0.0.12:11434/
    name: gpu-a
    gpu: {exporter: http://10.0.0.12:9400/metrics}
  - url: HTTP://Box.LAN:11434
    gpu: {vram_mb: [8192, 8192.5]}
  - url: https://10.0.0.14
    gpu: none
    headers: {Authorization: "Bearer ${OLLAMA_TOKEN}", X-Plain: plain}
  - url: http://[::1]:8080
    gpu: {vram_mb: 24576}
  - url: http://127.0.0.2:11434
    gpu: NVML
    name: local2
  - url: http://127.0.0.3:11434
    gpu: {exporter: "http://127.0.0.3:9835"}
    ollama_env: {OLLAMA_NUM_PARALLEL: 2, OLLAMA_FLASH_ATTENTION: true}
    tls_verify: false
priority_models:
  - mxbai-embed-large
  - {name: "llama3.1:8b", replicas: 1, nodes: [gpu-a], num_ctx: 16384}
  - {name: hf.co/org/model, replicas: all, pull: true}
  - {name: qwen2.5:7b, replicas: 2, nodes: [gpu-a, local2], pull: no}
ollama_env:
  OLLAMA_CONTEXT_LENGTH: 8192
  OLLAMA_KV_CACHE_TYPE: q8_0
  OLLAMA_NUM_PARALLEL: "1"
check_interval: 5m
watch_interval: 0
vram_safety_margin: 1
vram_reserve_mb: 512
auto_optimize: no
request_timeout: 2.5
load_timeout: 1h30m
evict: ANY
cpu_fallback: yes
state_dir: /srv/gpu-router
log_level: debug
listen: 127.0.0.1:9464
down_after: 3
pull_missing: true
max_concurrent_pulls: 2
pull_timeout: 30m
"""


def test_rich_form() -> None:
    config = parse(RICH)
    assert config == Config(
        nodes=(
            NodeConfig(name="localhost:11434", url="http://localhost:11434"),
            NodeConfig(
                name="gpu-a",
                url="http://10.0.0.12:11434",
                gpu=GpuSpec(kind="exporter", exporter_url="http://10.0.0.12:9400/metrics"),
            ),
            NodeConfig(
                name="box.lan:11434",
                url="http://box.lan:11434",
                gpu=GpuSpec(kind="static", vram_bytes=(8192 * MIB, 8192 * MIB + MIB // 2)),
            ),
            NodeConfig(
                name="10.0.0.14",
                url="https://10.0.0.14:443",
                gpu=GpuSpec(kind="none"),
                headers=MappingProxyType({"Authorization": f"Bearer {SECRET}", "X-Plain": "plain"}),
            ),
            NodeConfig(
                name="[::1]:8080",
                url="http://[::1]:8080",
                gpu=GpuSpec(kind="static", vram_bytes=(24576 * MIB,)),
            ),
            NodeConfig(name="local2", url="http://127.0.0.2:11434", gpu=GpuSpec(kind="nvml")),
            NodeConfig(
                name="127.0.0.3:11434",
                url="http://127.0.0.3:11434",
                gpu=GpuSpec(kind="exporter", exporter_url="http://127.0.0.3:9835/metrics", tls_verify=False),
                ollama_env=MappingProxyType({"OLLAMA_NUM_PARALLEL": 2, "OLLAMA_FLASH_ATTENTION": True}),
                tls_verify=False,
            ),
        ),
        priority_models=(
            PriorityModel(name="mxbai-embed-large:latest"),
            PriorityModel(name="llama3.1:8b", replicas=1, nodes=("gpu-a",), num_ctx=16384),
            PriorityModel(name="hf.co/org/model:latest", replicas="all", pull=True),
            PriorityModel(name="qwen2.5:7b", replicas=2, nodes=("gpu-a", "local2"), pull=False),
        ),
        check_interval_s=300.0,
        watch_interval_s=0.0,
        vram_safety_margin=1.0,
        vram_reserve_bytes=512 * MIB,
        auto_optimize=False,
        request_timeout_s=2.5,
        load_timeout_s=5400.0,
        log_level="DEBUG",
        evict="any",
        cpu_fallback=True,
        state_dir="/srv/gpu-router",
        ollama_env=MappingProxyType(
            {"OLLAMA_CONTEXT_LENGTH": 8192, "OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_NUM_PARALLEL": "1"}
        ),
        listen="127.0.0.1:9464",
        down_after=3,
        pull_missing=True,
        max_concurrent_pulls=2,
        pull_timeout_s=1800.0,
        path="config.yaml",
    )
    # Per-node keys win over the top level, key by key.
    assert dict(config.node_env(config.nodes[6])) == {
        "OLLAMA_CONTEXT_LENGTH": 8192,
        "OLLAMA_KV_CACHE_TYPE": "q8_0",
        "OLLAMA_NUM_PARALLEL": 2,
        "OLLAMA_FLASH_ATTENTION": True,
    }
    assert config.node_env(config.nodes[0]) == config.ollama_env
    assert [config.wants_pull(m) for m in config.priority_models] == [True, True, True, False]
    assert isinstance(config.check_interval_s, float)
    assert isinstance(config.vram_reserve_bytes, int)
    assert hash(config) == hash(parse(RICH))  # frozen and hashable even with headers


def test_null_lists_mean_empty_and_state_dir_expands_home() -> None:
    config = parse(
        """\
        nodes:
          - url: http://127.0.0.1:11434
            headers:
        priority_models:
        state_dir: ~/gpu-router-state
        """
    )
    assert config.priority_models == ()
    assert dict(config.nodes[0].headers) == {}
    assert config.state_dir == os.path.expanduser("~/gpu-router-state")


def test_yaml_merge_keys_and_anchors() -> None:
    config = parse(
        """\
        nodes:
          - &base
            url: http://127.0.0.1:1
            headers: {Authorization: "Bearer ${OLLAMA_TOKEN}"}
          - <<: *base
            url: http://127.0.0.1:2
        """
    )
    assert [n.url for n in config.nodes] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert config.nodes[1].headers["Authorization"] == f"Bearer {SECRET}"


def test_unquoted_exponent_is_a_number() -> None:
    # PyYAML (YAML 1.1) reads a plain 1e-3 as a string; a person means a number.
    config = parse("nodes: [http://127.0.0.1:1]\nvram_safety_margin: 1e-3\ncheck_interval: 1e3\n")
    assert config.vram_safety_margin == 0.001
    assert config.check_interval_s == 1000.0


def test_shipped_example_loads() -> None:
    config = load_config(str(EXAMPLE), environ={})
    assert config == Config(
        nodes=(NodeConfig(name="localhost:11434", url="http://localhost:11434"),),
        priority_models=(PriorityModel(name="mxbai-embed-large:latest"), PriorityModel(name="llama3.1:8b")),
        path=str(EXAMPLE),
    )


def test_shipped_example_lists_every_key_with_its_default() -> None:
    text = EXAMPLE.read_text()
    defaults = Config(nodes=())
    expected = {
        "check_interval": "300",
        "watch_interval": "10",
        "vram_safety_margin": str(defaults.vram_safety_margin),
        "vram_reserve_mb": "0",
        "auto_optimize": "true",
        "request_timeout": "5",
        "load_timeout": "300",
        "evict": defaults.evict,
        "down_after": str(defaults.down_after),
        "pull_missing": "false",
        "max_concurrent_pulls": str(defaults.max_concurrent_pulls),
        "pull_timeout": "3600",
        "cpu_fallback": "false",
        "state_dir": "null",
        "log_level": defaults.log_level,
    }
    for key, value in expected.items():
        assert re.search(rf"^{key}: {re.escape(value)}$", text, re.MULTILINE), key
    assert float(expected["check_interval"]) == defaults.check_interval_s
    assert float(expected["load_timeout"]) == defaults.load_timeout_s
    assert float(expected["request_timeout"]) == defaults.request_timeout_s
    assert float(expected["watch_interval"]) == defaults.watch_interval_s


def test_shipped_example_commented_nodes_are_valid_when_uncommented() -> None:
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        # ca_file stays commented: its example path does not exist here.
        m = re.match(r"^(\s*)# (- url:|  (?:name|gpu|headers|ollama_env):|nodes:)(.*)$", line)
        lines.append(f"{m.group(1)}{m.group(2)}{m.group(3)}" if m else line)
    config = parse_config("\n".join(lines), "example", environ=ENV)
    kinds = [n.gpu.kind for n in config.nodes]
    assert kinds == ["auto", "exporter", "static", "none", "static"]
    assert config.nodes[3].headers["Authorization"] == f"Bearer {SECRET}"
    assert dict(config.nodes[4].ollama_env) == {
        "OLLAMA_NUM_PARALLEL": 4,
        "OLLAMA_FLASH_ATTENTION": 1,
        "OLLAMA_KV_CACHE_TYPE": "q8_0",
    }
    assert config.priority_models[1].nodes == ("gpu-a",)


# --------------------------------------------------------------------------- bad files

BAD = [
    # structure
    (
        "- http://x\n",
        "config.yaml:1: the top level must be a mapping of settings (key: value), got a list",
    ),
    (
        "just text\n",
        ("config.yaml:1: the top level must be a mapping of settings (key: value), got a string 'just text'"),
    ),
    (
        "check_interval: 30\n",
        (
            "config.yaml:1: nodes: required: list at least one Ollama server, e.g. nodes: "
            "[http://localhost:11434]"
        ),
    ),
    (
        "nodes: []\n",
        "config.yaml:1: nodes: must list at least one Ollama server",
    ),
    (
        "nodes:\n",
        (
            "config.yaml:1: nodes: expected a list of Ollama server URLs (one '- http://host:11434' "
            "per line), got no value"
        ),
    ),
    (
        "nodes: http://x\n",
        (
            "config.yaml:1: nodes: expected a list of Ollama server URLs (one '- http://host:11434' "
            "per line), got a string 'http://x'"
        ),
    ),
    (
        "nodes: [http://x]\ncheck_intervall: 30\n",
        "config.yaml:2: check_intervall: unknown key (did you mean 'check_interval'?)",
    ),
    (
        "nodes: [http://x]\ncheck-interval: 30\n",
        "config.yaml:2: check-interval: unknown key (did you mean 'check_interval'?)",
    ),
    (
        "nodes: [http://x]\nzzz: 1\n",
        "config.yaml:2: zzz: unknown key (config/config.yaml lists every setting with its default)",
    ),
    (
        "nodes: [http://x]\n1: 2\n",
        "config.yaml:2: keys must be strings, got the number 1",
    ),
    (
        "nodes: [http://x]\nnodes: [http://y]\n",
        "config.yaml:2: nodes: duplicate key (first at line 1)",
    ),
    (
        "nodes: [http://x\n",
        (
            "config.yaml:2: invalid YAML: while parsing a flow sequence at line 1, expected ',' or "
            "']', but got '<stream end>'"
        ),
    ),
    (
        "nodes:\n  - http://x\n bad: 1\n",
        (
            "config.yaml:3: invalid YAML: while parsing a block mapping at line 1, expected <block "
            "end>, but found '<block mapping start>'"
        ),
    ),
    (
        "nodes: [http://x]\n---\nnodes: [http://y]\n",
        (
            "config.yaml:2: invalid YAML: expected a single document in the stream at line 1, but "
            "found another document"
        ),
    ),
    (
        "nodes: [!!binary aGk=]\n",
        (
            "config.yaml:1: nodes[0]: expected a URL or a mapping with url:, got a value tagged "
            "tag:yaml.org,2002:binary"
        ),
    ),
    (
        "nodes: [http://x]\ndown_after: !!int abc\n",
        "config.yaml:2: down_after: cannot read 'abc' as int",
    ),
    (
        "nodes: [http://x]\n<<: 5\n",
        (
            "config.yaml:2: invalid YAML merge: expected a mapping or list of mappings for merging, "
            "but found scalar"
        ),
    ),
    # node entries and urls
    (
        "nodes:\n  - 5\n",
        "config.yaml:2: nodes[0]: expected a URL or a mapping with url:, got the number 5",
    ),
    (
        "nodes:\n  - name: a\n",
        "config.yaml:2: nodes[0].url: required: the Ollama server, e.g. http://host:11434",
    ),
    (
        "nodes:\n  - url: http://x\n    nmae: a\n",
        "config.yaml:3: nodes[0].nmae: unknown key (did you mean 'name'?)",
    ),
    (
        "nodes:\n  - http://a\n  - url: htp://x\n",
        "config.yaml:3: nodes[1].url: 'htp://x' is not an http(s) URL",
    ),
    (
        "nodes:\n  - localhost:11434\n",
        (
            "config.yaml:2: nodes[0]: 'localhost:11434' is not an http(s) URL (did you mean "
            "'http://localhost:11434'?)"
        ),
    ),
    (
        "nodes:\n  - http://\n",
        "config.yaml:2: nodes[0]: 'http://' is not an http(s) URL",
    ),
    (
        "nodes:\n  - http://x:99999\n",
        "config.yaml:2: nodes[0]: 'http://x:99999' has an invalid port",
    ),
    (
        "nodes:\n  - http://x:11434/ollama\n",
        (
            "config.yaml:2: nodes[0]: 'http://x:11434/ollama': a path is not supported; give "
            "scheme://host:port"
        ),
    ),
    (
        "nodes:\n  - url: 11434\n",
        "config.yaml:2: nodes[0].url: expected an http(s) URL, got the number 11434",
    ),
    (
        "nodes:\n  - http://x:1\n  - url: http://X:1/\n",
        "config.yaml:3: nodes[1].url: duplicate node url 'http://x:1' (also nodes[0], line 2)",
    ),
    (
        "nodes:\n  - http://x\n  - https://x\n",
        (
            "config.yaml:3: nodes[1]: duplicate node name 'x' (also nodes[0], line 2); "
            "it comes from the url, so set name:"
        ),
    ),
    (
        "nodes:\n  - {url: http://a, name: n}\n  - {url: http://b, name: n}\n",
        "config.yaml:3: nodes[1].name: duplicate node name 'n' (also nodes[0], line 2)",
    ),
    (
        "nodes:\n  - {url: http://a, name: 'gpu a'}\n",
        "config.yaml:2: nodes[0].name: a node name must be non-empty with no spaces, got 'gpu a'",
    ),
    (
        "nodes:\n  - {url: http://a, name: ''}\n",
        "config.yaml:2: nodes[0].name: a node name must be non-empty with no spaces, got ''",
    ),
    (
        "nodes:\n  - {url: http://a, name: 7}\n",
        "config.yaml:2: nodes[0].name: expected a string, got the number 7",
    ),
    # gpu
    (
        "nodes:\n  - url: http://a\n    gpu: nvidia\n",
        (
            "config.yaml:3: nodes[0].gpu: expected auto, nvml, amd, none, {exporter: URL} or {vram_mb: "
            "N}, got a string 'nvidia'"
        ),
    ),
    (
        "nodes:\n  - url: http://a\n    gpu: nvm\n",
        (
            "config.yaml:3: nodes[0].gpu: expected auto, nvml, amd, none, {exporter: URL} or {vram_mb: "
            "N}, got a string 'nvm' (did you mean 'nvml'?)"
        ),
    ),
    (
        "nodes:\n  - url: http://a\n    gpu: false\n",
        (
            "config.yaml:3: nodes[0].gpu: expected auto, nvml, amd, none, {exporter: URL} or {vram_mb: "
            "N}, got a boolean (false)"
        ),
    ),
    (
        "nodes:\n  - url: http://a\n    gpu: exporter\n",
        ("config.yaml:3: nodes[0].gpu: an exporter needs its URL: gpu: {exporter: http://HOST:9400/metrics}"),
    ),
    (
        "nodes:\n  - url: http://a\n    gpu: [8192]\n",
        (
            "config.yaml:3: nodes[0].gpu: expected auto, nvml, amd, none, {exporter: URL} or {vram_mb: "
            "N}, got a list"
        ),
    ),
    (
        "nodes:\n  - url: http://a\n    gpu: {}\n",
        "config.yaml:3: nodes[0].gpu: give exactly one of exporter: or vram_mb:",
    ),
    (
        "nodes:\n  - url: http://a\n    gpu: {exporter: http://a:9400, vram_mb: 1}\n",
        "config.yaml:3: nodes[0].gpu: give exactly one of exporter: or vram_mb:",
    ),
    (
        "nodes:\n  - url: http://a\n    gpu: {vram: 8192}\n",
        "config.yaml:3: nodes[0].gpu.vram: unknown key (did you mean 'vram_mb'?)",
    ),
    (
        "nodes:\n  - url: http://a\n    gpu: {exporter: 'a:9400'}\n",
        (
            "config.yaml:3: nodes[0].gpu.exporter: 'a:9400' is not an http(s) URL (did you mean "
            "'http://a:9400'?)"
        ),
    ),
    (
        'nodes:\n  - url: http://a\n    gpu: {vram_mb: "8192"}\n',
        (
            "config.yaml:3: nodes[0].gpu.vram_mb: expected a number of MiB or a list of them (one "
            "per GPU), got a string '8192' (remove the quotes)"
        ),
    ),
    (
        "nodes:\n  - url: http://a\n    gpu: {vram_mb: 8GB}\n",
        (
            "config.yaml:3: nodes[0].gpu.vram_mb: expected a number of MiB or a list of them (one "
            "per GPU), got a string '8GB'"
        ),
    ),
    (
        "nodes:\n  - url: http://a\n    gpu: {vram_mb: []}\n",
        "config.yaml:3: nodes[0].gpu.vram_mb: must list at least one GPU",
    ),
    (
        "nodes:\n  - url: http://a\n    gpu:\n      vram_mb:\n        - 8192\n        - 0\n",
        "config.yaml:6: nodes[0].gpu.vram_mb[1]: must be > 0 MiB, got 0",
    ),
    (
        "nodes:\n  - url: http://a\n    gpu: {vram_mb: [true]}\n",
        (
            "config.yaml:3: nodes[0].gpu.vram_mb[0]: expected a number of MiB or a list of them (one "
            "per GPU), got a boolean (true)"
        ),
    ),
    # headers (no value ever appears)
    (
        "nodes:\n  - url: http://a\n    headers: [Authorization]\n",
        "config.yaml:3: nodes[0].headers: expected a mapping of header names to values, got a list",
    ),
    (
        "nodes:\n  - url: http://a\n    headers: {Bad Name: x}\n",
        "config.yaml:3: nodes[0].headers.Bad Name: not a valid HTTP header name",
    ),
    (
        "nodes:\n  - url: http://a\n    headers: {X-Pin: 123456}\n",
        "config.yaml:3: nodes[0].headers.X-Pin: expected a string value, got a number",
    ),
    (
        "nodes:\n  - url: http://a\n    headers:\n      X-A: a\n      x-a: b\n",
        ("config.yaml:5: nodes[0].headers.x-a: duplicate header (header names ignore case; first at line 4)"),
    ),
    (
        "nodes:\n  - url: http://a\n    headers: {Authorization: 'Bearer ${MISSING_TOKEN}'}\n",
        "config.yaml:3: nodes[0].headers.Authorization: environment variable MISSING_TOKEN is not set",
    ),
    (
        "nodes:\n  - url: http://a\n    headers: {Authorization: 'Bearer ${EMPTY}'}\n",
        "config.yaml:3: nodes[0].headers.Authorization: environment variable EMPTY is empty",
    ),
    (
        "nodes:\n  - url: http://a\n    headers: {Authorization: 'Bearer ${1x}'}\n",
        (
            "config.yaml:3: nodes[0].headers.Authorization: malformed ${...} reference: expected "
            "${NAME} with letters, digits and _"
        ),
    ),
    (
        "nodes:\n  - url: http://a\n    headers: {Authorization: 'Bearer ${OLLAMA_TOKEN'}\n",
        "config.yaml:3: nodes[0].headers.Authorization: unclosed ${ in the value",
    ),
    (
        'nodes:\n  - url: http://a\n    headers: {Authorization: "a\\nb"}\n',
        ("config.yaml:3: nodes[0].headers.Authorization: a header value must not contain line breaks or NUL"),
    ),
    (
        'nodes:\n  - url: http://a\n    headers: {X-Team: "\u00e9quipe \u20ac5"}\n',
        (
            "config.yaml:3: nodes[0].headers.X-Team: character 8 of the value (after ${VAR} expansion) "
            "cannot be sent in an HTTP header (only Latin-1 text can)"
        ),
    ),
    (
        "nodes:\n  - http://user:pw@a:11434\n",
        "config.yaml:2: nodes[0]: credentials in a URL would be logged; send them with headers: instead",
    ),
    (
        "nodes:\n  - http://a:11434/?token=abc\n",
        ("config.yaml:2: nodes[0]: a URL with a query or fragment is not supported (put tokens in headers:)"),
    ),
    # priority models
    (
        "nodes: [http://a]\npriority_models: llama3\n",
        (
            "config.yaml:2: priority_models: expected a list of model names (one '- name:tag' per "
            "line), got a string 'llama3'"
        ),
    ),
    (
        "nodes: [http://a]\npriority_models: [5]\n",
        (
            "config.yaml:2: priority_models[0]: expected a model name or a mapping with name:, got "
            "the number 5"
        ),
    ),
    (
        "nodes: [http://a]\npriority_models:\n  - llama3\n  - llama3:latest\n",
        (
            "config.yaml:4: priority_models[1]: duplicate priority model 'llama3:latest' (also "
            "priority_models[0], line 3)"
        ),
    ),
    (
        "nodes: [http://a]\npriority_models:\n  - 'llama 3'\n",
        ("config.yaml:3: priority_models[0]: a model name must be non-empty with no spaces, got 'llama 3'"),
    ),
    (
        "nodes: [http://a]\npriority_models:\n  - 'llama3:'\n",
        "config.yaml:3: priority_models[0]: 'llama3:' has an empty tag",
    ),
    (
        "nodes: [http://a]\npriority_models:\n  - {replicas: 1}\n",
        "config.yaml:3: priority_models[0].name: required: the model, e.g. llama3.1:8b",
    ),
    (
        "nodes: [http://a]\npriority_models:\n  - {name: x, replica: 1}\n",
        "config.yaml:3: priority_models[0].replica: unknown key (did you mean 'replicas'?)",
    ),
    (
        "nodes: [http://a]\npriority_models:\n  - {name: x, replicas: 0}\n",
        "config.yaml:3: priority_models[0].replicas: must be >= 1 or 'all', got 0",
    ),
    (
        "nodes: [http://a]\npriority_models:\n  - {name: x, replicas: true}\n",
        (
            "config.yaml:3: priority_models[0].replicas: expected a whole number >= 1 or 'all', got "
            "a boolean (true)"
        ),
    ),
    (
        "nodes: [http://a]\npriority_models:\n  - {name: x, replicas: '1'}\n",
        (
            "config.yaml:3: priority_models[0].replicas: expected a whole number >= 1 or 'all', got "
            "a string '1' (remove the quotes)"
        ),
    ),
    (
        "nodes: [http://a]\npriority_models:\n  - {name: x, replicas: every}\n",
        (
            "config.yaml:3: priority_models[0].replicas: expected a whole number >= 1 or 'all', got "
            "a string 'every'"
        ),
    ),
    (
        "nodes: [http://a]\npriority_models:\n  - {name: x, replicas: 1.5}\n",
        (
            "config.yaml:3: priority_models[0].replicas: expected a whole number >= 1 or 'all', got "
            "the number 1.5"
        ),
    ),
    (
        "nodes: [http://a]\npriority_models:\n  - {name: x, replicas: 2}\n",
        (
            "config.yaml:3: priority_models[0].replicas: 2 replicas but only 1 node configured; "
            "'all' means one on each"
        ),
    ),
    (
        ("nodes: [http://a, http://b, http://c]\npriority_models:\n  - {name: x, replicas: 2, nodes: [a]}\n"),
        ("config.yaml:3: priority_models[0].replicas: 2 replicas but its nodes: list has only 1"),
    ),
    (
        "nodes: [{url: http://a, name: gpu-a}]\npriority_models:\n  - {name: x, nodes: gpu-a}\n",
        "config.yaml:3: priority_models[0].nodes: expected a list of node names, got a string 'gpu-a'",
    ),
    (
        "nodes: [{url: http://a, name: gpu-a}]\npriority_models:\n  - {name: x, nodes: []}\n",
        "config.yaml:3: priority_models[0].nodes: empty list: remove the key to allow any node",
    ),
    (
        "nodes: [{url: http://a, name: gpu-a}]\npriority_models:\n  - {name: x, nodes: [gpu-b]}\n",
        "config.yaml:3: priority_models[0].nodes[0]: no node is named 'gpu-b' (did you mean 'gpu-a'?)",
    ),
    (
        "nodes: [{url: http://a, name: gpu-a}]\npriority_models:\n  - {name: x, nodes: [zzz]}\n",
        "config.yaml:3: priority_models[0].nodes[0]: no node is named 'zzz' (nodes are: gpu-a)",
    ),
    (
        ("nodes: [{url: http://a, name: gpu-a}]\npriority_models:\n  - {name: x, nodes: [gpu-a, gpu-a]}\n"),
        "config.yaml:3: priority_models[0].nodes[1]: 'gpu-a' is listed twice",
    ),
    (
        "nodes: [http://a, http://b]\npriority_models:\n  - {name: x, replicas: 3}\n",
        (
            "config.yaml:3: priority_models[0].replicas: 3 replicas but only 2 nodes configured; "
            "'all' means one on each"
        ),
    ),
    # scalars
    (
        "nodes: [http://a]\ncheck_interval: 0\n",
        "config.yaml:2: check_interval: must be > 0, got 0",
    ),
    (
        "nodes: [http://a]\ncheck_interval: 0s\n",
        "config.yaml:2: check_interval: must be > 0, got 0s",
    ),
    (
        "nodes: [http://a]\ncheck_interval: -5\n",
        "config.yaml:2: check_interval: must be > 0, got -5",
    ),
    (
        "nodes: [http://a]\ncheck_interval: yes\n",
        (
            "config.yaml:2: check_interval: expected seconds or a duration such as '30s', '5m' or "
            "'1h', got a boolean (yes)"
        ),
    ),
    (
        "nodes: [http://a]\ncheck_interval: '300'\n",
        (
            "config.yaml:2: check_interval: expected seconds or a duration such as '30s', '5m' or "
            "'1h', got a string '300' (remove the quotes)"
        ),
    ),
    (
        "nodes: [http://a]\ncheck_interval: 5 minutes\n",
        (
            "config.yaml:2: check_interval: expected seconds or a duration such as '30s', '5m' or "
            "'1h', got a string '5 minutes'"
        ),
    ),
    (
        "nodes: [http://a]\ncheck_interval:\n",
        "config.yaml:2: check_interval: missing value (remove the key to use the default)",
    ),
    (
        "nodes: [http://a]\nwatch_interval: -1\n",
        "config.yaml:2: watch_interval: must be >= 0 (0 = off), got -1",
    ),
    (
        "nodes: [http://a]\nrequest_timeout: 0\n",
        "config.yaml:2: request_timeout: must be > 0, got 0",
    ),
    (
        "nodes: [http://a]\nload_timeout: []\n",
        (
            "config.yaml:2: load_timeout: expected seconds or a duration such as '30s', '5m' or "
            "'1h', got a list"
        ),
    ),
    (
        "nodes: [http://a]\nvram_safety_margin: 0\n",
        "config.yaml:2: vram_safety_margin: must be > 0 and <= 1 (a fraction of VRAM), got 0",
    ),
    (
        "nodes: [http://a]\nvram_safety_margin: 1.01\n",
        "config.yaml:2: vram_safety_margin: must be > 0 and <= 1 (a fraction of VRAM), got 1.01",
    ),
    (
        "nodes: [http://a]\nvram_safety_margin: 80%\n",
        "config.yaml:2: vram_safety_margin: expected a number, got a string '80%'",
    ),
    (
        "nodes: [http://a]\nvram_safety_margin: .nan\n",
        "config.yaml:2: vram_safety_margin: expected a finite number, got .nan",
    ),
    (
        "nodes: [http://a]\nvram_reserve_mb: -1\n",
        "config.yaml:2: vram_reserve_mb: must be >= 0, got -1",
    ),
    (
        "nodes: [http://a]\nvram_reserve_mb: true\n",
        "config.yaml:2: vram_reserve_mb: expected a number of MiB, got a boolean (true)",
    ),
    (
        "nodes: [http://a]\nnum_ctx: 8192\n",
        (
            "config.yaml:2: num_ctx: no longer a setting: the context is what each node's Ollama uses. "
            "Write it as Ollama's own variable, ollama_env: {OLLAMA_CONTEXT_LENGTH: N} (top level or per "
            "node), or per model as priority_models[].num_ctx"
        ),
    ),
    (
        "nodes: [http://a]\npriority_models: [{name: m, num_ctx: 0}]\n",
        "config.yaml:2: priority_models[0].num_ctx: must be >= 1, got 0",
    ),
    (
        "nodes: [http://a]\npriority_models: [{name: m, num_ctx: 4096.5}]\n",
        "config.yaml:2: priority_models[0].num_ctx: expected a whole number, got the number 4096.5",
    ),
    (
        "nodes: [http://a]\npriority_models: [{name: m, num_ctx: '4096'}]\n",
        (
            "config.yaml:2: priority_models[0].num_ctx: expected a whole number, got a string '4096' "
            "(remove the quotes)"
        ),
    ),
    (
        "nodes: [http://a]\npriority_models: [{name: m, pull: 'yes'}]\n",
        "config.yaml:2: priority_models[0].pull: expected true or false, got a string 'yes'",
    ),
    (
        "nodes: [http://a]\nollama_env: {CONTEXT_LENGTH: 8192}\n",
        (
            "config.yaml:2: ollama_env.CONTEXT_LENGTH: not an Ollama setting: names are Ollama's own "
            "environment variables, OLLAMA_... (did you mean 'OLLAMA_CONTEXT_LENGTH'?)"
        ),
    ),
    (
        "nodes: [http://a]\nollama_env: {HOME: /root}\n",
        (
            "config.yaml:2: ollama_env.HOME: not an Ollama setting: names are Ollama's own "
            "environment variables, OLLAMA_..."
        ),
    ),
    (
        "nodes: [http://a]\nollama_env: {OLLAMA_NUM_PARALLEL: [1]}\n",
        "config.yaml:2: ollama_env.OLLAMA_NUM_PARALLEL: expected a value as Ollama reads it, got a list",
    ),
    (
        "nodes: [http://a]\nollama_env: {OLLAMA_NUM_PARALLEL: two}\n",
        (
            "config.yaml:2: ollama_env.OLLAMA_NUM_PARALLEL: 'two' is not a whole number; Ollama reads digits "
            "only (a number of parallel requests, e.g. 2) and ignores the rest"
        ),
    ),
    (
        "nodes:\n  - url: http://a\n    ollama_env: {OLLAMA_FLASH_ATTENTION: yes please}\n",
        (
            "config.yaml:3: nodes[0].ollama_env.OLLAMA_FLASH_ATTENTION: 'yes please' is not a boolean Ollama "
            "reads (1, t, true, TRUE, True / 0, f, false, FALSE, False); Ollama would treat it as true"
        ),
    ),
    (
        "nodes: [http://a]\nollama_env: {OLLAMA_KV_CACHE_TYPE: q3}\n",
        (
            "config.yaml:2: ollama_env.OLLAMA_KV_CACHE_TYPE: 'q3' is not a cache type Ollama knows: f16, "
            "q8_0, q4_0 (and from v0.30 also f32, bf16, q4_1, q5_0, q5_1, iq4_nl)"
        ),
    ),
    (
        "nodes: [http://a]\nollama_env: {OLLAMA_GPU_OVERHEAD: 512MiB}\n",
        (
            "config.yaml:2: ollama_env.OLLAMA_GPU_OVERHEAD: '512MiB' is not a whole number; Ollama reads "
            "digits only (bytes per GPU, e.g. 536870912) and ignores the rest"
        ),
    ),
    (
        "nodes: [http://a]\nollama_env: [OLLAMA_NUM_PARALLEL=2]\n",
        "config.yaml:2: ollama_env: expected a mapping of OLLAMA_* variables to values, got a list",
    ),
    (
        "nodes:\n  - url: http://a\n    ollama_env: {ollama_num_parallel: 2}\n",
        (
            "config.yaml:3: nodes[0].ollama_env.ollama_num_parallel: not an Ollama setting: names are "
            "Ollama's own environment variables, OLLAMA_... (did you mean 'OLLAMA_NUM_PARALLEL'?)"
        ),
    ),
    (
        "nodes:\n  - url: https://a\n    ca_file: relative.pem\n",
        "config.yaml:3: nodes[0].ca_file: must be an absolute path, got 'relative.pem'",
    ),
    (
        "nodes:\n  - url: https://a\n    ca_file: /nonexistent/ca.pem\n",
        (
            "config.yaml:3: nodes[0].ca_file: '/nonexistent/ca.pem' is not a readable file (a PEM "
            "bundle of CA certificates)"
        ),
    ),
    (
        "nodes: [http://a]\nlisten: 9464\n",
        "config.yaml:2: listen: expected host:port, e.g. 127.0.0.1:9464, got the number 9464",
    ),
    (
        "nodes: [http://a]\nlisten: localhost\n",
        "config.yaml:2: listen: 'localhost': missing port; write host:port, e.g. 127.0.0.1:9464",
    ),
    (
        "nodes: [http://a]\nlisten: ':9464'\n",
        (
            "config.yaml:2: listen: ':9464': missing host; write 127.0.0.1:PORT, or 0.0.0.0:PORT for every "
            "interface"
        ),
    ),
    (
        "nodes: [http://a]\nlisten: 127.0.0.1:70000\n",
        "config.yaml:2: listen: '127.0.0.1:70000': port 70000 is not in 1-65535",
    ),
    (
        "nodes: [http://a]\nlisten: 0.0.0.0:9464\n",
        (
            "config.yaml:2: listen: 0.0.0.0:9464 is reachable from other hosts: set api_token "
            "(e.g. api_token: ${GPU_ROUTER_TOKEN}) or listen on 127.0.0.1"
        ),
    ),
    (
        "nodes: [http://a]\nlisten: gpu-router.lan:9464\n",
        (
            "config.yaml:2: listen: gpu-router.lan:9464 is reachable from other hosts: set api_token "
            "(e.g. api_token: ${GPU_ROUTER_TOKEN}) or listen on 127.0.0.1"
        ),
    ),
    (
        "nodes: [http://a]\napi_token: short\n",
        "config.yaml:2: api_token: must be at least 16 printable characters without spaces",
    ),
    (
        "nodes: [http://a]\napi_token: 12345678901234567890\n",
        "config.yaml:2: api_token: expected a string, got a number",
    ),
    (
        "nodes: [http://a]\napi_token: ${NOT_SET}\n",
        "config.yaml:2: api_token: environment variable NOT_SET is not set",
    ),
    (
        "nodes: [http://a]\ndown_after: 0\n",
        "config.yaml:2: down_after: must be >= 1, got 0",
    ),
    (
        "nodes: [http://a]\nmax_concurrent_pulls: 0\n",
        "config.yaml:2: max_concurrent_pulls: must be >= 1, got 0",
    ),
    (
        "nodes: [http://a]\npull_timeout: 0\n",
        "config.yaml:2: pull_timeout: must be > 0, got 0",
    ),
    (
        "nodes: [http://a]\npull_missing: 1\n",
        "config.yaml:2: pull_missing: expected true or false, got the number 1",
    ),
    (
        "nodes: [http://a]\nauto_optimize: 'true'\n",
        "config.yaml:2: auto_optimize: expected true or false, got a string 'true'",
    ),
    (
        "nodes: [http://a]\ncpu_fallback: 1\n",
        "config.yaml:2: cpu_fallback: expected true or false, got the number 1",
    ),
    (
        "nodes: [http://a]\nevict: no\n",
        "config.yaml:2: evict: expected one of never, idle, any, got a boolean (no)",
    ),
    (
        "nodes: [http://a]\nevict: idel\n",
        "config.yaml:2: evict: expected one of never, idle, any, got 'idel' (did you mean 'idle'?)",
    ),
    (
        "nodes: [http://a]\nlog_level: WARN\n",
        (
            "config.yaml:2: log_level: expected one of DEBUG, INFO, WARNING, ERROR, got 'WARN' "
            "(did you mean 'WARNING'?)"
        ),
    ),
    (
        "nodes: [http://a]\nlog_level: 10\n",
        "config.yaml:2: log_level: expected one of DEBUG, INFO, WARNING, ERROR, got the number 10",
    ),
    (
        "nodes: [http://a]\nstate_dir: relative/dir\n",
        "config.yaml:2: state_dir: must be an absolute path, got 'relative/dir'",
    ),
    (
        "nodes: [http://a]\nstate_dir: [a]\n",
        "config.yaml:2: state_dir: expected a directory path or null, got a list",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_config_message(text: str, message: str) -> None:
    err = error(text, environ={**ENV, "EMPTY": ""})
    assert str(err) == message
    assert err.path == "config.yaml"
    assert isinstance(err.line, int)
    assert str(err).startswith(f"config.yaml:{err.line}: ")
    assert err.message
    assert err.message in str(err)
    if err.key:
        assert f": {err.key}: " in str(err)


def test_error_fields() -> None:
    err = error("nodes:\n  - http://a\n  - url: htp://x\n")
    assert (err.path, err.line, err.key, err.message) == (
        "config.yaml",
        3,
        "nodes[1].url",
        "'htp://x' is not an http(s) URL",
    )
    assert not isinstance(err, ConfigNotFound)
    assert EX_CONFIG == 78


def test_earliest_duplicate_key_is_reported() -> None:
    text = "nodes:\n  - url: http://x\n    headers: {A: '1', A: '2'}\nb: 1\nb: 2\nb: 3\n"
    assert str(error(text)) == "config.yaml:3: nodes[0].headers.A: duplicate key (first at line 3)"
    assert (
        str(error("nodes: [http://x]\nb: 1\nb: 2\nb: 3\n"))
        == "config.yaml:3: b: duplicate key (first at line 2)"
    )


def test_config_error_pickles() -> None:
    err = error("nodes: [htp://x]\n")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.path, copy.line, copy.key, copy.message) == (err.path, err.line, err.key, err.message)
    assert str(copy) == str(err)


def test_later_error_lines_are_exact() -> None:
    text = """\
        # header comment

        nodes:
          - http://a

        # gap
        priority_models:
          - a
          - b
          - {name: c, replicas: -3}
        """
    err = error(text)
    assert str(err) == "config.yaml:10: priority_models[2].replicas: must be >= 1 or 'all', got -3"


@pytest.mark.parametrize("odd", ["\r", "\x85", "\u2028", "\u2029"], ids=["CR", "NEL", "LS", "PS"])
@pytest.mark.parametrize(
    ("document", "want"),
    [
        ("# note{odd}# more\nnodes:\n  - http://a\npriority_models: 5\n", 4),  # a bad value
        ("# note{odd}# more\nnodes:\n  - http://a\nnodes: [http://b]\n", 4),  # a duplicate key
        ("# note{odd}# more\nnodes: [http://a,\n", 3),  # a YAML error naming its context's line
        ("# note{odd}# more\nnodes: [http://a]\n\x07\n", 3),  # a character YAML refuses to read
    ],
)
def test_error_lines_are_the_lines_sed_shows(odd: str, document: str, want: int) -> None:
    # YAML also ends a line at a lone CR, NEL, LS and PS: in a comment, such a break must not move
    # the error's line (or a line the message names) from where an editor, grep or sed shows it.
    def located(text: str) -> tuple[int | None, str]:
        with pytest.raises(ConfigError) as info:
            parse_config(text, "config.yaml")
        return info.value.line, info.value.message

    text = document.format(odd=odd)
    line, message = located(text)
    assert (line, message) == located(document.format(odd=" "))
    assert line == want


# --------------------------------------------------------------------------- secrets


SECRET_CASES = [
    f"nodes:\n  - url: http://a\n    headers: {{Authorization: 'Bearer {SECRET}', 'Bad Name': x}}\n",
    f"nodes:\n  - url: http://a\n    headers: {{Authorization: 'Bearer {SECRET} ${{NOPE}}'}}\n",
    f"nodes:\n  - url: http://a\n    headers: {{Authorization: 'Bearer {SECRET} ${{bad name}}'}}\n",
    f"nodes:\n  - url: http://a\n    headers: {{Authorization: 'Bearer {SECRET} ${{OPEN'}}\n",
    f'nodes:\n  - url: http://a\n    headers: {{Authorization: "{SECRET}\\r\\nX: y"}}\n',
    "nodes:\n  - url: http://a\n    headers: {X-Pin: 8675309}\n",
    f'nodes:\n  - url: http://a\n    headers: {{Authorization: "Bearer {SECRET}}}\n',  # unterminated quote
    f"nodes:\n  - url: http://a\n    headers:\n      Authorization: Bearer {SECRET}\n"
    "      Authorization: x\n",
    f"nodes:\n  - url: http://user:{SECRET}@a\n",
    f"nodes:\n  - url: http://a/?key={SECRET}\n",
    "nodes:\n  - url: http://a\n    headers: {Authorization: 'Bearer ${OLLAMA_TOKEN}'}\nzzz: 1\n",
]


def test_non_latin1_header_after_expansion_is_refused_without_the_value() -> None:
    # http.client sends header values as Latin-1: a value that is not would fail on every request,
    # so it is refused when the config is read, naming the key and never the value.
    secret = "tok-\u20ac-" + SECRET
    err = error(
        "nodes:\n  - url: http://a\n    headers: {Authorization: 'Bearer ${OLLAMA_TOKEN}'}\n",
        environ={"OLLAMA_TOKEN": secret},
    )
    assert str(err) == (
        "config.yaml:3: nodes[0].headers.Authorization: character 12 of the value (after ${VAR} "
        "expansion) cannot be sent in an HTTP header (only Latin-1 text can)"
    )
    assert secret not in repr(err)
    # Latin-1 beyond ASCII is fine.
    ok = parse(
        "nodes:\n  - url: http://a\n    headers: {X-Name: 'caf\u00e9'}\n",
    )
    assert ok.nodes[0].headers["X-Name"] == "caf\u00e9"


def test_api_token_allows_any_listen_address_and_is_never_shown() -> None:
    token = "t0ken-" + SECRET
    config = parse(
        "nodes: [http://a]\nlisten: 0.0.0.0:9464\napi_token: ${GPU_ROUTER_TOKEN}\n",
        environ={"GPU_ROUTER_TOKEN": token},
    )
    assert (config.listen, config.api_token) == ("0.0.0.0:9464", token)
    assert token not in repr(config)
    assert parse("nodes: [http://a]\nlisten: '[::1]:9464'\n").listen == "[::1]:9464"
    assert parse("nodes: [http://a]\nlisten: localhost:1\n").listen == "localhost:1"
    err = error("nodes: [http://a]\napi_token: 'has a space in it here'\n")
    assert "has a space" not in str(err)


def test_tls_settings(tmp_path: pathlib.Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    config = parse(
        f"nodes:\n  - url: https://a\n    ca_file: {ca}\n  - url: https://b\n    tls_verify: off\n"
    )
    assert (config.nodes[0].ca_file, config.nodes[0].tls_verify) == (str(ca), True)
    assert (config.nodes[1].ca_file, config.nodes[1].tls_verify) == (None, False)


@pytest.mark.parametrize("text", SECRET_CASES)
def test_header_values_never_in_errors(text: str) -> None:
    err = error(text)
    for leaked in (SECRET, "8675309"):
        assert leaked not in str(err)
        assert leaked not in repr(err)
        assert all(leaked not in str(arg) for arg in err.args)


def test_header_values_never_in_repr() -> None:
    config = parse(RICH)
    node = config.nodes[3]
    assert node.headers["Authorization"] == f"Bearer {SECRET}"
    for text in (repr(config), str(config), repr(node), str(config.nodes)):
        assert SECRET not in text
        assert "plain" not in text  # no header value at all, secret or not
    assert "headers=<2 hidden: Authorization, X-Plain>" in repr(node)
    assert "headers=<0 hidden>" in repr(config.nodes[0])


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=8, max_size=40))
def test_repr_does_not_depend_on_header_values(secret: str) -> None:
    text = "nodes:\n  - url: http://127.0.0.1:1\n    headers: {X-Key: '${K}'}\n"
    config = parse_config(text, "c.yaml", environ={"K": secret})
    other = parse_config(text, "c.yaml", environ={"K": "x"})
    assert config.nodes[0].headers["X-Key"] == secret
    assert config != other
    assert repr(config) == repr(other)


# --------------------------------------------------------------------------- round trips


@settings(max_examples=100, deadline=None)
@given(
    margin=st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_subnormal=False),
    reserve_mb=st.integers(min_value=0, max_value=1 << 24),
    interval=st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False),
)
def test_valid_numbers_round_trip(margin: float, reserve_mb: int, interval: float) -> None:
    config = parse_config(
        f"nodes: [http://127.0.0.1:1]\nvram_safety_margin: {margin!r}\nvram_reserve_mb: {reserve_mb}\n"
        f"check_interval: {interval!r}\n",
        "c.yaml",
    )
    assert config.vram_safety_margin == margin
    assert config.vram_reserve_bytes == reserve_mb * MIB
    assert config.check_interval_s == interval


@settings(max_examples=50, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False).filter(lambda m: not 0 < m <= 1))
def test_out_of_range_margin_is_rejected(margin: float) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"nodes: [http://127.0.0.1:1]\nvram_safety_margin: {margin!r}\n", "c.yaml")
    assert info.value.key == "vram_safety_margin"
    assert info.value.line == 2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        (".5m", 30.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5 m", "m", "5d", "-5s", "1h 30m", "5mm"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("name", "normal"),
    [
        ("llama3", "llama3:latest"),
        (" llama3:8b ", "llama3:8b"),
        ("hf.co/a/b", "hf.co/a/b:latest"),
        ("localhost:5000/m", "localhost:5000/m:latest"),
        ("localhost:5000/m:q4", "localhost:5000/m:q4"),
    ],
)
def test_normalize_model_name(name: str, normal: str) -> None:
    assert normalize_model_name(name) == normal


# --------------------------------------------------------------------------- load_config


def test_load_config_reports_path_as_given(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "c.yaml").write_text("nodes:\n  - url: htp://x\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("./c.yaml")
    assert str(info.value) == "./c.yaml:2: nodes[0].url: 'htp://x' is not an http(s) URL"
    (tmp_path / "ok.yaml").write_text("\ufeffnodes: [http://127.0.0.1:1]\n")  # a BOM is fine
    assert load_config(pathlib.Path("ok.yaml")).path == "ok.yaml"


def test_load_config_missing_file(tmp_path: pathlib.Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigNotFound) as info:
        load_config(missing)
    assert str(info.value) == (
        f"{missing}: no such file; copy config/config.yaml from the gpu-router source tree to "
        f"{DEFAULT_CONFIG_PATH} and edit it, or pass --config PATH"
    )


@pytest.mark.parametrize("content", [b"", b"# only comments\n\n", b"\n"])
def test_load_config_empty_file(tmp_path: pathlib.Path, content: bytes) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: the file is empty; it must list at least nodes:"


def test_load_config_invalid_utf8_and_control_messages(tmp_path: pathlib.Path) -> None:
    bad_utf8 = tmp_path / "a.yaml"
    bad_utf8.write_bytes(b"nodes: [http://a]\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"a\.yaml:2: not valid UTF-8 text$"):
        load_config(bad_utf8)
    control = tmp_path / "b.yaml"
    control.write_bytes(b"nodes: [http://a]\nx: \x07\n")
    with pytest.raises(ConfigError, match=r"b\.yaml:2: invalid YAML: character #x0007: special characters"):
        load_config(control)


def test_load_config_directory(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: is a directory, not a config file"
    assert not isinstance(info.value, ConfigNotFound)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_config_unreadable(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("nodes: [http://a]\n")
    path.chmod(0)
    with pytest.raises(ConfigError, match=r"c\.yaml: cannot read: Permission denied$"):
        load_config(path)


# --------------------------------------------------------------------------- find_config_path


@pytest.fixture
def files(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    out = {}
    for name in ("explicit", "env", "confdir", "etc"):
        d = tmp_path / name
        d.mkdir()
        out[name] = d / "config.yaml"
        out[name].write_text("nodes: [http://127.0.0.1:1]\n")
    return out


def test_find_config_order(files: dict[str, pathlib.Path]) -> None:
    environ = {
        "GPU_ROUTER_CONFIG": str(files["env"]),
        "CONFIGURATION_DIRECTORY": str(files["confdir"].parent),
    }
    etc = files["etc"]
    assert find_config_path(str(files["explicit"]), environ, default_path=etc) == files["explicit"]
    assert find_config_path(None, environ, default_path=etc) == files["env"]
    del environ["GPU_ROUTER_CONFIG"]
    assert find_config_path(None, environ, default_path=etc) == files["confdir"]
    files["confdir"].unlink()  # a systemd directory without the file falls through
    assert find_config_path(None, environ, default_path=etc) == etc
    assert find_config_path(None, {}, default_path=etc) == etc
    assert find_config_path("", {"GPU_ROUTER_CONFIG": ""}, default_path=etc) == etc


def test_find_config_colon_separated_configuration_directory(files: dict[str, pathlib.Path]) -> None:
    environ = {"CONFIGURATION_DIRECTORY": f"/nonexistent-dir:{files['confdir'].parent}"}
    assert find_config_path(None, environ, default_path=files["etc"]) == files["confdir"]


def test_find_config_explicit_missing_is_an_error(
    files: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigNotFound) as info:
        find_config_path(missing, {}, default_path=files["etc"])
    assert str(info.value) == f"{missing}: no such file (given with --config)"
    assert info.value.path == missing


def test_find_config_env_missing_is_an_error(files: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigNotFound) as info:
        find_config_path(None, {"GPU_ROUTER_CONFIG": missing}, default_path=files["etc"])
    assert str(info.value) == f"{missing}: no such file (given by $GPU_ROUTER_CONFIG)"


def test_config_not_found_message(tmp_path: pathlib.Path) -> None:
    etc = tmp_path / "etc" / "config.yaml"
    confdir = tmp_path / "run"
    with pytest.raises(ConfigNotFound) as info:
        find_config_path(None, {"CONFIGURATION_DIRECTORY": str(confdir)}, default_path=etc)
    assert str(info.value) == (
        f"no config file found (looked in {confdir / 'config.yaml'}, {etc}); "
        f"copy config/config.yaml from the gpu-router source tree to {etc} and edit it, "
        "or pass --config PATH (or set $GPU_ROUTER_CONFIG)"
    )
    assert not etc.exists()  # never writes a config


def test_find_config_default_constant() -> None:
    assert pathlib.Path("/etc/gpu-router/config.yaml") == DEFAULT_CONFIG_PATH


# --------------------------------------------------------------------------- default_state_dir


def test_state_dir_order(tmp_path: pathlib.Path) -> None:
    base = Config(nodes=())
    system = tmp_path / "var-lib" / "gpu-router"
    (tmp_path / "var-lib").mkdir()
    home = tmp_path / "home"
    env = {"STATE_DIRECTORY": "/var/lib/a:/var/lib/b", "XDG_STATE_HOME": "/xdg", "HOME": str(home)}
    explicit = Config(nodes=(), state_dir="/srv/state")
    assert default_state_dir(explicit, env, system_dir=system) == pathlib.Path("/srv/state")
    assert default_state_dir(base, env, system_dir=system) == pathlib.Path("/var/lib/a")
    del env["STATE_DIRECTORY"]
    assert default_state_dir(base, env, system_dir=system) == system  # creatable
    system.mkdir()
    assert default_state_dir(base, env, system_dir=system) == system  # exists and writable
    not_creatable = tmp_path / "no-such-parent" / "gpu-router"
    assert default_state_dir(base, env, system_dir=not_creatable) == pathlib.Path("/xdg/gpu-router")
    env["XDG_STATE_HOME"] = "relative"  # the XDG spec says to ignore it
    assert default_state_dir(base, env, system_dir=not_creatable) == home / ".local" / "state" / "gpu-router"
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert default_state_dir(base, {"HOME": str(home)}, system_dir=a_file) == home / ".local/state/gpu-router"
    assert not (home / ".local").exists()  # creates nothing


def test_libyaml_and_pure_python_parsers_give_the_same_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    if getattr(yaml, "CSafeLoader", None) is None:
        pytest.skip("PyYAML built without libyaml")
    fast = parse(RICH)
    monkeypatch.delattr(yaml, "CSafeLoader")
    assert parse(RICH) == fast
    assert parse("nodes: [http://127.0.0.1:1]\nvram_safety_margin: 1e-3\n").vram_safety_margin == 0.001
