"""YAML configuration -> frozen :class:`Config`.

The file is composed (not constructed) with PyYAML's safe loader so that every value keeps the line it
came from; a hand-written walker then checks each key and raises one :class:`ConfigError` that names
the file, the line and the key path (``nodes[1].url``). Nothing here logs or prints a header value.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Literal, NoReturn, cast
from urllib.parse import urlsplit

import yaml
from yaml.constructor import SafeConstructor

from gpu_router.listen import is_loopback, parse_listen
from gpu_router.memory.env import SIZING_KEYS, EnvValueError, parse_ollama_env
from gpu_router.records import field, record, replace

GpuKind = str
"""``auto`` or a row name of :data:`gpu_router.gpus.kinds.GPU_SOURCE_KINDS` (nvml, amd, exporter...)."""
EvictPolicy = Literal["never", "idle", "any"]

OLLAMA_SIZING_NAMES = SIZING_KEYS
"""The OLLAMA_* settings that change how much VRAM a model needs."""

EX_CONFIG = 78  # sysexits.h: a configuration error; systemd must not restart-loop on it

DEFAULT_CONFIG_PATH = pathlib.Path("/etc/gpu-router/config.yaml")
"""Where the daemon looks last, and where install.sh puts the example."""

DEFAULT_STATE_DIR = pathlib.Path("/var/lib/gpu-router")
"""The system state directory, used when writable and nothing more specific is set."""

CONFIG_ENV = "GPU_ROUTER_CONFIG"
"""Environment variable naming the config file (after ``--config``)."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EVICT_POLICIES: tuple[EvictPolicy, ...] = ("never", "idle", "any")

_MIB = 1024 * 1024


@record
class GpuSpec:
    """How to learn a node's GPU memory: ``kind`` is ``auto`` or a GPU source kind's name."""

    kind: GpuKind = "auto"
    exporter_url: str | None = None  # kind == "exporter"
    vram_bytes: tuple[int, ...] = ()  # kind == "static": one total per GPU
    # The node's TLS settings, for an https:// exporter (the node's ca_file and tls_verify).
    ca_file: str | None = None
    tls_verify: bool = True


EnvValue = str | int | float | bool
"""An ``OLLAMA_*`` value as written in YAML; Ollama itself reads them all as strings."""


def _no_env() -> Mapping[str, EnvValue]:
    return MappingProxyType({})


@record
class NodeConfig:
    """One Ollama server. Its ``repr`` shows header names only, never their values."""

    name: str  # default: host:port of the url
    url: str  # normalised: scheme://host:port, no trailing slash
    gpu: GpuSpec = GpuSpec()
    # Sent with every request to this node; never logged or printed. hash=False keeps the node hashable.
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    # The node's own OLLAMA_* settings, as written under nodes[].ollama_env (not merged with the top level).
    ollama_env: Mapping[str, EnvValue] = field(default_factory=_no_env, hash=False)
    ca_file: str | None = None  # CA bundle for an https:// node and its exporter
    tls_verify: bool = True

    def __repr__(self) -> str:
        hidden = ", ".join(self.headers)
        return (
            f"NodeConfig(name={self.name!r}, url={self.url!r}, gpu={self.gpu!r}, "
            f"headers=<{len(self.headers)} hidden{': ' + hidden if hidden else ''}>, "
            f"ollama_env={dict(self.ollama_env)!r}, ca_file={self.ca_file!r}, tls_verify={self.tls_verify!r})"
        )


@record
class PriorityModel:
    """A model that should stay resident on GPU."""

    name: str  # normalised: a tag is always present ("x" -> "x:latest")
    replicas: int | Literal["all"] = 1
    nodes: tuple[str, ...] = ()  # node names allowed to hold it; empty = any
    num_ctx: int | None = None  # load (and size) it at this context; sent as options.num_ctx
    pull: bool | None = None  # pull it where it is missing; None = the top-level pull_missing


@record
class Config:
    """The whole validated configuration. Built once per (re)load and never mutated."""

    nodes: tuple[NodeConfig, ...]
    priority_models: tuple[PriorityModel, ...] = ()
    check_interval_s: float = 300.0
    watch_interval_s: float = 10.0  # 0 = off
    vram_safety_margin: float = 0.8
    vram_reserve_bytes: int = 0
    auto_optimize: bool = True
    request_timeout_s: float = 5.0
    load_timeout_s: float = 300.0
    log_level: str = "INFO"
    evict: EvictPolicy = "idle"
    cpu_fallback: bool = False
    state_dir: str | None = None
    # OLLAMA_* settings every node runs with unless its own ollama_env says otherwise.
    ollama_env: Mapping[str, EnvValue] = field(default_factory=_no_env, hash=False)
    listen: str | None = None  # "host:port" of the metrics/status listener; None = no listener
    api_token: str | None = field(default=None, repr=False)  # never printed
    down_after: int = 2  # consecutive failed polls before a node counts as down
    pull_missing: bool = False
    max_concurrent_pulls: int = 1
    pull_timeout_s: float = 3600.0
    path: str = ""  # the file it came from, for messages

    def node_env(self, node: NodeConfig) -> Mapping[str, EnvValue]:
        """The OLLAMA_* settings of one node: the top-level ones, overridden key by key by the node's."""
        if not node.ollama_env:
            return self.ollama_env
        return MappingProxyType({**self.ollama_env, **node.ollama_env})

    def unused_env(self) -> list[str]:
        """``where: NAME`` for every OLLAMA_* setting that sizing does not use, for --check-config."""
        out = [f"ollama_env: {k}" for k in self.ollama_env if k not in OLLAMA_SIZING_NAMES]
        for node in self.nodes:
            out += [
                f"nodes[{node.name}].ollama_env: {k}" for k in node.ollama_env if k not in OLLAMA_SIZING_NAMES
            ]
        return out

    def wants_pull(self, model: PriorityModel) -> bool:
        """Whether a missing priority model may be pulled onto a node that would fit it."""
        return self.pull_missing if model.pull is None else model.pull


def normalize_model_name(name: str) -> str:
    """Ollama's display name: a tag is always present (``llama3`` -> ``llama3:latest``)."""
    name = name.strip()
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def is_cloud_name(name: str) -> bool:
    """A name Ollama resolves to a cloud model: a ``:cloud`` source suffix, or a tag ending in ``-cloud``.

    Ollama's own rule (``parseSourceSuffix`` in internal/modelref/modelref.go@v0.30.0): the text after
    the last ``:`` is ``cloud``, or ends in ``-cloud`` and holds no ``/``. Pulling such a name only
    fetches a stub that runs on Ollama's servers, so gpu-router never pulls one.
    """
    raw = name.strip()
    idx = raw.rfind(":")
    if idx < 0:
        return False
    suffix = raw[idx + 1 :].strip()
    lowered = suffix.lower()
    return lowered == "cloud" or ("/" not in suffix and lowered.endswith("-cloud"))


class ConfigError(Exception):
    """A configuration problem: ``str(e)`` is ``"<path>:<line>: <key>: <message>"``.

    ``line`` is 1-based or None; ``key`` is a dotted path such as ``nodes[1].url`` or empty. Parts that
    are empty are left out of ``str(e)``.
    """

    def __init__(self, path: str, line: int | None, key: str, message: str) -> None:
        super().__init__(path, line, key, message)
        self.path = path
        self.line = line
        self.key = key
        self.message = message

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where = f"{where}:{self.line}"
        parts = [p for p in (where, self.key, self.message) if p]
        # A key is the user's text: a line break or control character in it must not split or
        # garble the one line a journal or terminal shows.
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in ": ".join(parts))


class ConfigNotFound(ConfigError):
    """No config file where one was asked for or searched; the message says how to make one."""


# --------------------------------------------------------------------------- durations

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def _close_matches(word: str, choices: list[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    import difflib  # only for a "did you mean" hint: a valid config never needs it

    return difflib.get_close_matches(word, choices, n=n, cutoff=cutoff)


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration such as ``"30s"``, ``"5m"``, ``"1h30m"`` or ``"1.5s"``.

    Raises ValueError for anything else, including a bare number: a unit is required.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f"not a duration: {text!r}")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total


# --------------------------------------------------------------------------- YAML walking

_T = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = _T + "str", _T + "int", _T + "float", _T + "bool", _T + "null"
_MERGE = _T + "merge"

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_VAR_REF = re.compile(r"\$\{([^}]*)\}")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_NODE_KEYS = ("url", "name", "gpu", "headers", "ollama_env", "ca_file", "tls_verify")
_MODEL_KEYS = ("name", "replicas", "nodes", "num_ctx", "pull")
# Keys that once existed: a config that still has one gets told what replaced it, not "unknown key".
_REMOVED_KEYS = {
    "num_ctx": (
        "no longer a setting: the context is what each node's Ollama uses. Write it as Ollama's own "
        "variable, ollama_env: {OLLAMA_CONTEXT_LENGTH: N} (top level or per node), or per model as "
        "priority_models[].num_ctx"
    ),
}
_ENV_PREFIX = "OLLAMA_"
_ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")

_Pairs = dict[str, tuple[yaml.Node, yaml.Node]]


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


# YAML also ends a line at a lone CR, NEL, LS and PS; editors, grep and sed end one at LF alone.
_YAML_ONLY_BREAK = re.compile("\r(?!\n)|[\x85\u2028\u2029]")


class _Lines:
    """1-based line numbers of YAML marks, counted as editors, grep and sed count them (at LF).

    YAML's own numbers run ahead of the file's after a lone CR (a classic-Mac line end) or a NEL, LS
    or PS (U+0085 is what a Windows-1252 ellipsis becomes when mis-decoded); a file without them
    keeps YAML's numbers, which are then the same.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._lfs: list[int] | None = None
        if _YAML_ONLY_BREAK.search(text):
            self._lfs = [m.start() for m in re.finditer("\n", text)]

    def of(self, mark: yaml.Mark) -> int:
        return int(mark.line) + 1 if self._lfs is None else self.at(mark.index)

    def at(self, index: int) -> int:
        """The line of the character at ``index`` of the text: the LFs before it, plus one."""
        if self._lfs is None:
            return self._text.count("\n", 0, max(index, 0)) + 1
        return bisect_left(self._lfs, index) + 1


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = _close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _plain_float(node: yaml.Node) -> float | None:
    """The value of an unquoted scalar that YAML 1.1 reads as a string but is a number to a person
    (``1e-5``: PyYAML's float needs a dot and a signed exponent)."""
    if not (isinstance(node, yaml.ScalarNode) and node.tag == _STR and not node.style):
        return None
    try:
        return float(str(node.value))
    except ValueError:
        return None


def _quoted_number(node: yaml.Node) -> bool:
    if not (isinstance(node, yaml.ScalarNode) and node.tag == _STR and node.style in ("'", '"')):
        return False
    try:
        float(str(node.value).strip())
    except ValueError:
        return False
    return True


class _Walker:
    """Turns a composed YAML tree into a Config, raising ConfigError at the first problem."""

    def __init__(self, path: str, environ: Mapping[str, str], lines: _Lines) -> None:
        self.path = path
        self.environ = environ
        self.lines = lines
        self._constructor = SafeConstructor()

    def _line(self, node: yaml.Node) -> int:
        return self.lines.of(node.start_mark)

    # ----------------------------------------------------------------- errors and descriptions

    def fail(self, node: yaml.Node | None, key: str, message: str) -> NoReturn:
        raise ConfigError(self.path, self._line(node) if node is not None else None, key, message)

    @staticmethod
    def describe(node: yaml.Node, *, secret: bool = False) -> str:
        """What the user wrote, in words; with ``secret`` the value itself is left out."""
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        assert isinstance(node, yaml.ScalarNode)
        text = str(node.value)
        if node.tag == _NULL:
            return "no value"
        if node.tag == _BOOL:
            return "a boolean" if secret else f"a boolean ({text})"
        if node.tag in (_INT, _FLOAT):
            return "a number" if secret else f"the number {text}"
        if node.tag == _STR:
            return "a string" if secret else f"a string {_short(text)}"
        return f"a value tagged {node.tag}"

    def type_error(self, node: yaml.Node, key: str, expected: str, *, numeric: bool = False) -> NoReturn:
        hint = ""
        if numeric and _quoted_number(node):
            hint = " (remove the quotes)"
        self.fail(node, key, f"expected {expected}, got {self.describe(node)}{hint}")

    # ----------------------------------------------------------------- pre-pass

    def prepare(self, root: yaml.Node) -> None:
        """Reject duplicate keys, then resolve ``<<`` merges, over the whole tree once."""
        seen: set[int] = set()
        stack: list[tuple[yaml.Node, str]] = [(root, "")]
        duplicates: list[tuple[int, str, str]] = []  # the earliest in the file is reported
        while stack:
            node, key = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.MappingNode):
                first: dict[str, int] = {}
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.tag == _STR:
                        name = str(k.value)
                        if name in first:
                            duplicates.append(
                                (
                                    self._line(k),
                                    _join(key, name),
                                    f"duplicate key (first at line {first[name]})",
                                )
                            )
                        else:
                            first[name] = self._line(k)
                        stack.append((v, _join(key, name)))
                    else:
                        stack.append((v, key))
            elif isinstance(node, yaml.SequenceNode):
                stack.extend((item, f"{key}[{i}]") for i, item in enumerate(node.value))
        if duplicates:
            line, key, message = min(duplicates)
            raise ConfigError(self.path, line, key, message)
        # Merges after the duplicate check: a key written beside `<<:` legitimately overrides a merged one.
        for node in self._mappings(root):
            try:
                self._constructor.flatten_mapping(node)
            except yaml.MarkedYAMLError as e:
                mark = e.problem_mark or e.context_mark
                raise ConfigError(
                    self.path, self.lines.of(mark) if mark else None, "", f"invalid YAML merge: {e.problem}"
                ) from None

    @staticmethod
    def _mappings(root: yaml.Node) -> list[yaml.MappingNode]:
        out: list[yaml.MappingNode] = []
        seen: set[int] = set()
        stack = [root]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.MappingNode):
                out.append(node)
                for k, v in node.value:
                    stack.extend((k, v))
            elif isinstance(node, yaml.SequenceNode):
                stack.extend(node.value)
        return out

    # ----------------------------------------------------------------- containers

    def mapping(self, node: yaml.Node, key: str, expected: str, allowed: Iterable[str] | None) -> _Pairs:
        """The pairs of a mapping, last one winning (merges come first); unknown keys are errors."""
        if not isinstance(node, yaml.MappingNode):
            self.type_error(node, key, expected)
        pairs: _Pairs = {}
        allowed = tuple(allowed) if allowed is not None else None
        for k, v in node.value:
            if not (isinstance(k, yaml.ScalarNode) and k.tag == _STR):
                self.fail(k, key, f"keys must be strings, got {self.describe(k)}")
            name = str(k.value)
            if allowed is not None and name not in allowed:
                hint = _did_you_mean(name, allowed)
                if not hint:
                    listed = [a for a in allowed if a not in _REMOVED_KEYS]
                    hint = (
                        f" (expected one of: {', '.join(listed)})"
                        if len(listed) <= 8
                        else " (config/config.yaml lists every setting with its default)"
                    )
                self.fail(k, _join(key, name), f"unknown key{hint}")
            pairs[name] = (k, v)
        return pairs

    def sequence(self, node: yaml.Node, key: str, expected: str) -> list[yaml.Node]:
        """The items of a list; a string is never taken for a list of characters."""
        if not isinstance(node, yaml.SequenceNode):
            self.type_error(node, key, expected)
        return list(node.value)

    # ----------------------------------------------------------------- scalars

    def scalar(self, node: yaml.ScalarNode, key: str) -> object:
        """The Python value of a plain scalar (str, int, float, bool or None)."""
        construct: dict[str, Callable[[yaml.ScalarNode], object]] = {
            _STR: lambda n: str(n.value),
            _INT: self._constructor.construct_yaml_int,
            _FLOAT: self._constructor.construct_yaml_float,
            _BOOL: self._constructor.construct_yaml_bool,
            _NULL: self._constructor.construct_yaml_null,
        }
        fn = construct.get(node.tag)
        if fn is None:
            self.fail(node, key, f"unsupported YAML value {self.describe(node)}")
        try:
            return fn(node)
        except (ValueError, KeyError, TypeError):
            self.fail(node, key, f"cannot read {node.value!r} as {node.tag.rsplit(':', 1)[-1]}")

    def string(self, node: yaml.Node, key: str, expected: str = "a string") -> str:
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            return str(node.value)
        self.type_error(node, key, expected)

    def number(self, node: yaml.Node, key: str, expected: str = "a number") -> float:
        plain = _plain_float(node)
        if plain is not None or (isinstance(node, yaml.ScalarNode) and node.tag in (_INT, _FLOAT)):
            value = plain if plain is not None else self.scalar(cast(yaml.ScalarNode, node), key)
            assert isinstance(value, (int, float))
            if not math.isfinite(value):
                self.fail(node, key, f"expected a finite number, got {node.value}")
            return value
        self.type_error(node, key, expected, numeric=True)

    def integer(self, node: yaml.Node, key: str) -> int:
        if isinstance(node, yaml.ScalarNode) and node.tag == _INT:
            value = self.scalar(node, key)
            assert isinstance(value, int)
            return value
        self.type_error(node, key, "a whole number", numeric=True)

    def boolean(self, node: yaml.Node, key: str) -> bool:
        if isinstance(node, yaml.ScalarNode) and node.tag == _BOOL:
            return bool(self.scalar(node, key))
        self.type_error(node, key, "true or false")

    def duration(self, node: yaml.Node, key: str) -> float:
        expected = "seconds or a duration such as '30s', '5m' or '1h'"
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            try:
                return parse_duration(str(node.value))
            except ValueError:
                if _plain_float(node) is None:
                    self.type_error(node, key, expected, numeric=True)
        return self.number(node, key, expected)

    def choice(self, node: yaml.Node, key: str, choices: Iterable[str]) -> str:
        """One of ``choices``, matched case-insensitively; returns the canonical spelling."""
        choices = tuple(choices)
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            text = str(node.value).strip()
            for c in choices:
                if text.lower() == c.lower():
                    return c
            by_lower = {c.lower(): c for c in choices}
            close = _close_matches(text.lower(), list(by_lower), n=1, cutoff=0.6)
            hint = f" (did you mean {by_lower[close[0]]!r}?)" if close else ""
            self.fail(node, key, f"expected one of {', '.join(choices)}, got {_short(text)}{hint}")
        self.type_error(node, key, f"one of {', '.join(choices)}")

    # ----------------------------------------------------------------- URLs

    def url(self, node: yaml.Node, key: str, *, exporter: bool = False) -> tuple[str, str]:
        """``(normalised url, host[:port] as written)``; an exporter URL keeps (or gets) its path."""
        raw = self.string(node, key, "an http(s) URL").strip()
        parts = urlsplit(raw)
        if "@" in parts.netloc:
            # Never echo: the part before '@' is a password.
            self.fail(node, key, "credentials in a URL would be logged; send them with headers: instead")
        if parts.query or parts.fragment:
            self.fail(node, key, "a URL with a query or fragment is not supported (put tokens in headers:)")
        host = parts.hostname
        if parts.scheme.lower() not in ("http", "https") or not host or any(c.isspace() for c in raw):
            hint = f" (did you mean {'http://' + raw!r}?)" if raw and "://" not in raw else ""
            self.fail(node, key, f"{_short(raw)} is not an http(s) URL{hint}")
        try:
            port = parts.port
        except ValueError:
            self.fail(node, key, f"{_short(raw)} has an invalid port")
        scheme = parts.scheme.lower()
        host_text = f"[{host}]" if ":" in host else host
        netloc = host_text if port is None else f"{host_text}:{port}"
        full = f"{scheme}://{host_text}:{port if port is not None else (443 if scheme == 'https' else 80)}"
        if exporter:
            path = parts.path if parts.path not in ("", "/") else "/metrics"
            return full + path, netloc
        if parts.path not in ("", "/"):
            self.fail(node, key, f"{_short(raw)}: a path is not supported; give scheme://host:port")
        return full, netloc

    # ----------------------------------------------------------------- sections

    def top(self, root: yaml.Node) -> Config:
        if not isinstance(root, yaml.MappingNode):
            self.fail(
                root,
                "",
                f"the top level must be a mapping of settings (key: value), got {self.describe(root)}",
            )
        known = ("nodes", "priority_models", "ollama_env", *_SETTINGS, *_REMOVED_KEYS)
        pairs = self.mapping(root, "", "a mapping", known)
        for name, message in _REMOVED_KEYS.items():
            if name in pairs:
                self.fail(pairs[name][0], name, message)
        if "nodes" not in pairs:
            self.fail(
                root,
                "nodes",
                "required: list at least one Ollama server, e.g. nodes: [http://localhost:11434]",
            )
        nodes = self.nodes(pairs["nodes"][1])
        models: tuple[PriorityModel, ...] = ()
        if "priority_models" in pairs:
            models = self.priority_models(pairs["priority_models"][1], nodes)
        values: dict[str, Any] = {}  # Config field -> validated value
        if "ollama_env" in pairs:
            values["ollama_env"] = self.ollama_env(pairs["ollama_env"][1], "ollama_env")
        for name, setting in _SETTINGS.items():
            if name not in pairs:
                continue
            node = pairs[name][1]
            if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
                if not setting.nullable:
                    self.fail(node, name, "missing value (remove the key to use the default)")
                values[setting.attr] = None
                continue
            values[setting.attr] = setting.read(self, node, name)
        listen = values.get("listen")
        if listen is not None and not values.get("api_token") and not is_loopback(parse_listen(listen)[0]):
            self.fail(
                pairs["listen"][1],
                "listen",
                f"{listen} is reachable from other hosts: set api_token"
                " (e.g. api_token: ${GPU_ROUTER_TOKEN}) or listen on 127.0.0.1",
            )
        return Config(nodes=nodes, priority_models=models, path=self.path, **values)

    # ----------------------------------------------------------------- setting readers (see _SETTINGS)

    def seconds(self, node: yaml.Node, key: str, *, zero_ok: bool = False) -> float:
        seconds = self.duration(node, key)
        if seconds < 0 or (seconds == 0 and not zero_ok):
            self.fail(node, key, f"must be {'>= 0 (0 = off)' if zero_ok else '> 0'}, got {node.value}")
        return float(seconds)

    def count(self, node: yaml.Node, key: str, minimum: int = 1) -> int:
        value = self.integer(node, key)
        if value < minimum:
            self.fail(node, key, f"must be >= {minimum}, got {node.value}")
        return value

    def margin(self, node: yaml.Node, key: str) -> float:
        value = self.number(node, key)
        if not 0 < value <= 1:
            self.fail(node, key, f"must be > 0 and <= 1 (a fraction of VRAM), got {node.value}")
        return float(value)

    def mib(self, node: yaml.Node, key: str) -> int:
        value = self.number(node, key, "a number of MiB")
        if value < 0:
            self.fail(node, key, f"must be >= 0, got {node.value}")
        return round(value * _MIB)

    def absolute_path(self, node: yaml.Node, key: str) -> str:
        text = self.string(node, key, "a directory path or null").strip()
        expanded = os.path.expanduser(text)
        if not os.path.isabs(expanded):
            self.fail(node, key, f"must be an absolute path, got {_short(text)}")
        return expanded

    def listen(self, node: yaml.Node, key: str) -> str:
        text = self.string(node, key, "host:port, e.g. 127.0.0.1:9464").strip()
        try:
            host, port = parse_listen(text)
        except ValueError as e:
            self.fail(node, key, str(e))
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def secret(self, node: yaml.Node, key: str) -> str:
        if not (isinstance(node, yaml.ScalarNode) and node.tag == _STR):
            self.fail(node, key, f"expected a string, got {self.describe(node, secret=True)}")
        value = self.expand(str(node.value), node, key)
        if len(value) < 16 or any(c.isspace() or not c.isprintable() for c in value):
            self.fail(node, key, "must be at least 16 printable characters without spaces")
        self.latin1(value, node, key)
        return value

    def latin1(self, value: str, node: yaml.Node, key: str) -> None:
        """HTTP/1.1 sends header values as Latin-1: anything else would fail on every request."""
        try:
            value.encode("latin-1")
        except UnicodeEncodeError as e:
            self.fail(
                node,
                key,
                f"character {e.start + 1} of the value (after ${{VAR}} expansion) cannot be sent in an "
                "HTTP header (only Latin-1 text can)",
            )

    def ollama_env(self, node: yaml.Node, key: str) -> Mapping[str, EnvValue]:
        """``OLLAMA_*`` settings, named as Ollama names them; values as Ollama would read them."""
        if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
            return _no_env()
        pairs = self.mapping(node, key, "a mapping of OLLAMA_* variables to values", None)
        out: dict[str, EnvValue] = {}
        for name, (name_node, value_node) in pairs.items():
            env_key = _join(key, name)
            if not name.startswith(_ENV_PREFIX) or not _ENV_NAME.match(name):
                bare = name.upper().removeprefix(_ENV_PREFIX)
                close = _close_matches(bare, [n[len(_ENV_PREFIX) :] for n in OLLAMA_SIZING_NAMES])
                hint = f" (did you mean '{_ENV_PREFIX}{close[0]}'?)" if close else ""
                self.fail(
                    name_node,
                    env_key,
                    f"not an Ollama setting: names are Ollama's own environment variables, OLLAMA_...{hint}",
                )
            if not isinstance(value_node, yaml.ScalarNode) or value_node.tag == _NULL:
                self.fail(
                    value_node,
                    env_key,
                    f"expected a value as Ollama reads it, got {self.describe(value_node)}",
                )
            value = self.scalar(value_node, env_key)
            assert isinstance(value, (str, int, float, bool))
            try:
                # Checked as the node's Ollama would read it: a value it would silently ignore
                # would make gpu-router size models for settings the node does not have.
                parse_ollama_env({name: value})
            except EnvValueError as e:
                self.fail(value_node, env_key, e.message)
            out[name] = value
        return MappingProxyType(out)

    def nodes(self, seq: yaml.Node) -> tuple[NodeConfig, ...]:
        items = self.sequence(
            seq, "nodes", "a list of Ollama server URLs (one '- http://host:11434' per line)"
        )
        if not items:
            self.fail(seq, "nodes", "must list at least one Ollama server")
        out: list[NodeConfig] = []
        names: dict[str, tuple[str, int]] = {}
        urls: dict[str, tuple[str, int]] = {}
        for i, item in enumerate(items):
            key = f"nodes[{i}]"
            gpu = GpuSpec()
            headers: Mapping[str, str] = MappingProxyType({})
            extra: dict[str, Any] = {}  # NodeConfig fields from optional keys
            name_node: yaml.Node | None = None
            url_node: yaml.Node
            url_key: str
            if isinstance(item, yaml.ScalarNode) and item.tag == _STR:
                url_node, url_key = item, key
            elif isinstance(item, yaml.MappingNode):
                pairs = self.mapping(item, key, "a mapping", _NODE_KEYS)
                if "url" not in pairs:
                    self.fail(item, _join(key, "url"), "required: the Ollama server, e.g. http://host:11434")
                url_node, url_key = pairs["url"][1], _join(key, "url")
                if "name" in pairs:
                    name_node = pairs["name"][1]
                if "gpu" in pairs:
                    gpu = self.gpu(pairs["gpu"][1], _join(key, "gpu"))
                if "headers" in pairs:
                    headers = self.headers(pairs["headers"][1], _join(key, "headers"))
                if "ollama_env" in pairs:
                    extra["ollama_env"] = self.ollama_env(pairs["ollama_env"][1], _join(key, "ollama_env"))
                if "ca_file" in pairs:
                    extra["ca_file"] = self.ca_file(pairs["ca_file"][1], _join(key, "ca_file"))
                if "tls_verify" in pairs:
                    extra["tls_verify"] = self.boolean(pairs["tls_verify"][1], _join(key, "tls_verify"))
            else:
                self.type_error(item, key, "a URL or a mapping with url:")
            url, netloc = self.url(url_node, url_key)
            if url in urls:
                other, line = urls[url]
                self.fail(url_node, url_key, f"duplicate node url {url!r} (also {other}, line {line})")
            urls[url] = (key, self._line(url_node))
            if name_node is not None:
                name_key = _join(key, "name")
                name = self.string(name_node, name_key).strip()
                if not name or any(c.isspace() for c in name):
                    self.fail(
                        name_node, name_key, f"a node name must be non-empty with no spaces, got {name!r}"
                    )
                where, what = name_node, f"duplicate node name {name!r}"
            else:
                name, name_key, where = netloc, url_key, url_node
                what = f"duplicate node name {name!r}"
            if name in names:
                other, line = names[name]
                fix = "" if name_node is not None else "; it comes from the url, so set name:"
                self.fail(where, name_key, f"{what} (also {other}, line {line}){fix}")
            names[name] = (key, self._line(where))
            if gpu.exporter_url and ("ca_file" in extra or "tls_verify" in extra):
                gpu = replace(gpu, ca_file=extra.get("ca_file"), tls_verify=extra.get("tls_verify", True))
            out.append(NodeConfig(name=name, url=url, gpu=gpu, headers=headers, **extra))
        return tuple(out)

    def gpu(self, node: yaml.Node, key: str) -> GpuSpec:
        # Imported here, not at the top: the gpus package imports this module's types.
        from gpu_router.gpus import kinds

        expected = kinds.config_syntax()
        words = kinds.config_words()
        if isinstance(node, yaml.ScalarNode):
            if node.tag != _STR:
                self.type_error(node, key, expected)
            text = str(node.value).strip().lower()
            if text in words:
                return GpuSpec(kind=text)
            written = kinds.kind_named(text) or kinds.kind_for_key(text)
            if written is not None and written.value == "url":
                self.fail(
                    node,
                    key,
                    f"an {written.name} needs its URL: gpu: {{{written.config_key}: http://HOST:9400/metrics}}",
                )
            if written is not None and written.value == "mib":
                where = written.config_key
                self.fail(node, key, f"{written.name} sizes go in {where}: gpu: {{{where}: [24576]}}")
            hint = _did_you_mean(text, words)
            self.fail(node, key, f"expected {expected}, got {self.describe(node)}{hint}")
        mapping_keys = kinds.config_keys()
        pairs = self.mapping(node, key, expected, mapping_keys)
        if len(pairs) != 1:
            self.fail(node, key, f"give exactly one of {' or '.join(k + ':' for k in mapping_keys)}")
        ((config_key, (_, value_node)),) = pairs.items()
        kind = kinds.kind_for_key(config_key)
        assert kind is not None  # self.mapping() admitted only the table's keys
        value_key = _join(key, config_key)
        if kind.value == "url":
            url, _ = self.url(value_node, value_key, exporter=True)
            return GpuSpec(kind=kind.name, exporter_url=url)
        expected_mb = "a number of MiB or a list of them (one per GPU)"
        if isinstance(value_node, yaml.SequenceNode):
            items = [(item, f"{value_key}[{i}]") for i, item in enumerate(value_node.value)]
            if not items:
                self.fail(value_node, value_key, "must list at least one GPU")
        else:
            items = [(value_node, value_key)]
        sizes: list[int] = []
        for item, item_key in items:
            mib = self.number(item, item_key, expected_mb)
            if mib <= 0:
                self.fail(item, item_key, f"must be > 0 MiB, got {item.value}")
            sizes.append(round(mib * _MIB))
        return GpuSpec(kind=kind.name, vram_bytes=tuple(sizes))

    def ca_file(self, node: yaml.Node, key: str) -> str:
        path = self.absolute_path(node, key)
        if not os.path.isfile(path):
            self.fail(node, key, f"{_short(path)} is not a readable file (a PEM bundle of CA certificates)")
        return path

    def headers(self, node: yaml.Node, key: str) -> Mapping[str, str]:
        if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
            return MappingProxyType({})
        pairs = self.mapping(node, key, "a mapping of header names to values", None)
        out: dict[str, str] = {}
        lower: dict[str, int] = {}
        for name, (name_node, value_node) in pairs.items():
            hkey = _join(key, name)
            if not _HEADER_NAME.match(name):
                self.fail(name_node, hkey, "not a valid HTTP header name")
            if name.lower() in lower:
                self.fail(
                    name_node,
                    hkey,
                    f"duplicate header (header names ignore case; first at line {lower[name.lower()]})",
                )
            lower[name.lower()] = self._line(name_node)
            if not (isinstance(value_node, yaml.ScalarNode) and value_node.tag == _STR):
                self.fail(
                    value_node, hkey, f"expected a string value, got {self.describe(value_node, secret=True)}"
                )
            value = self.expand(str(value_node.value), value_node, hkey)
            if any(c in value for c in "\r\n\0"):
                self.fail(value_node, hkey, "a header value must not contain line breaks or NUL")
            self.latin1(value, value_node, hkey)
            out[name] = value
        return MappingProxyType(out)

    def expand(self, value: str, node: yaml.Node, key: str) -> str:
        """Replace each ``${VAR}`` from the environment; messages name the variable, never the value."""

        def sub(m: re.Match[str]) -> str:
            var = m.group(1)
            if not _VAR_NAME.match(var):
                self.fail(
                    node, key, "malformed ${...} reference: expected ${NAME} with letters, digits and _"
                )
            if var not in self.environ:
                self.fail(node, key, f"environment variable {var} is not set")
            if not self.environ[var]:
                self.fail(node, key, f"environment variable {var} is empty")
            return self.environ[var]

        expanded = _VAR_REF.sub(sub, value)
        if "${" in _VAR_REF.sub("", value):
            self.fail(node, key, "unclosed ${ in the value")
        return expanded

    def priority_models(self, seq: yaml.Node, nodes: tuple[NodeConfig, ...]) -> tuple[PriorityModel, ...]:
        if isinstance(seq, yaml.ScalarNode) and seq.tag == _NULL:
            return ()
        items = self.sequence(seq, "priority_models", "a list of model names (one '- name:tag' per line)")
        node_names = [n.name for n in nodes]
        out: list[PriorityModel] = []
        seen: dict[str, tuple[str, int]] = {}
        for i, item in enumerate(items):
            key = f"priority_models[{i}]"
            replicas: int | Literal["all"] = 1
            allowed: tuple[str, ...] = ()
            num_ctx: int | None = None
            pull: bool | None = None
            name_node: yaml.Node
            name_key: str
            if isinstance(item, yaml.ScalarNode) and item.tag == _STR:
                name_node, name_key = item, key
            elif isinstance(item, yaml.MappingNode):
                pairs = self.mapping(item, key, "a mapping", _MODEL_KEYS)
                if "name" not in pairs:
                    self.fail(item, _join(key, "name"), "required: the model, e.g. llama3.1:8b")
                name_node, name_key = pairs["name"][1], _join(key, "name")
                if "nodes" in pairs:
                    allowed = self.model_nodes(pairs["nodes"][1], _join(key, "nodes"), node_names)
                if "replicas" in pairs:
                    replicas = self.replicas(
                        pairs["replicas"][1], _join(key, "replicas"), allowed, len(nodes)
                    )
                if "num_ctx" in pairs:
                    num_ctx = self.count(pairs["num_ctx"][1], _join(key, "num_ctx"))
                if "pull" in pairs:
                    pull = self.boolean(pairs["pull"][1], _join(key, "pull"))
            else:
                self.type_error(item, key, "a model name or a mapping with name:")
            raw = self.string(name_node, name_key, "a model name such as llama3.1:8b").strip()
            if not raw or any(c.isspace() for c in raw):
                self.fail(name_node, name_key, f"a model name must be non-empty with no spaces, got {raw!r}")
            name = normalize_model_name(raw)
            if name.endswith(":"):
                self.fail(name_node, name_key, f"{raw!r} has an empty tag")
            if name in seen:
                other, line = seen[name]
                self.fail(
                    name_node, name_key, f"duplicate priority model {name!r} (also {other}, line {line})"
                )
            seen[name] = (key, self._line(name_node))
            out.append(PriorityModel(name=name, replicas=replicas, nodes=allowed, num_ctx=num_ctx, pull=pull))
        return tuple(out)

    def model_nodes(self, node: yaml.Node, key: str, node_names: list[str]) -> tuple[str, ...]:
        items = self.sequence(node, key, "a list of node names")
        if not items:
            self.fail(node, key, "empty list: remove the key to allow any node")
        out: list[str] = []
        for i, item in enumerate(items):
            item_key = f"{key}[{i}]"
            name = self.string(item, item_key, "a node name").strip()
            if name not in node_names:
                hint = _did_you_mean(name, node_names) or f" (nodes are: {', '.join(node_names)})"
                self.fail(item, item_key, f"no node is named {_short(name)}{hint}")
            if name in out:
                self.fail(item, item_key, f"{name!r} is listed twice")
            out.append(name)
        return tuple(out)

    def replicas(
        self, node: yaml.Node, key: str, allowed: tuple[str, ...], n_nodes: int
    ) -> int | Literal["all"]:
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            if str(node.value).strip().lower() == "all":
                return "all"
            self.type_error(node, key, "a whole number >= 1 or 'all'", numeric=True)
        if not (isinstance(node, yaml.ScalarNode) and node.tag == _INT):
            self.type_error(node, key, "a whole number >= 1 or 'all'")
        count = self.integer(node, key)
        if count < 1:
            self.fail(node, key, f"must be >= 1 or 'all', got {node.value}")
        if allowed and count > len(allowed):
            self.fail(node, key, f"{count} replicas but its nodes: list has only {len(allowed)}")
        if count > n_nodes:
            plural = "s" if n_nodes != 1 else ""
            self.fail(
                node,
                key,
                f"{count} replicas but only {n_nodes} node{plural} configured; 'all' means one on each",
            )
        return count


@record
class _Setting:
    """One top-level scalar setting: the Config field it fills and how its YAML value is checked."""

    attr: str
    read: Callable[[_Walker, yaml.Node, str], object]
    nullable: bool = False  # ``key: null`` is allowed and means "unset"


# Every top-level setting except the structured ones (nodes, priority_models, ollama_env): a new
# setting is one row here plus its Config field.
_SETTINGS: dict[str, _Setting] = {
    "check_interval": _Setting("check_interval_s", lambda w, n, k: w.seconds(n, k)),
    "watch_interval": _Setting("watch_interval_s", lambda w, n, k: w.seconds(n, k, zero_ok=True)),
    "request_timeout": _Setting("request_timeout_s", lambda w, n, k: w.seconds(n, k)),
    "load_timeout": _Setting("load_timeout_s", lambda w, n, k: w.seconds(n, k)),
    "pull_timeout": _Setting("pull_timeout_s", lambda w, n, k: w.seconds(n, k)),
    "vram_safety_margin": _Setting("vram_safety_margin", lambda w, n, k: w.margin(n, k)),
    "vram_reserve_mb": _Setting("vram_reserve_bytes", lambda w, n, k: w.mib(n, k)),
    "auto_optimize": _Setting("auto_optimize", lambda w, n, k: w.boolean(n, k)),
    "cpu_fallback": _Setting("cpu_fallback", lambda w, n, k: w.boolean(n, k)),
    "pull_missing": _Setting("pull_missing", lambda w, n, k: w.boolean(n, k)),
    "max_concurrent_pulls": _Setting("max_concurrent_pulls", lambda w, n, k: w.count(n, k)),
    "down_after": _Setting("down_after", lambda w, n, k: w.count(n, k)),
    "evict": _Setting("evict", lambda w, n, k: w.choice(n, k, EVICT_POLICIES)),
    "log_level": _Setting("log_level", lambda w, n, k: w.choice(n, k, LOG_LEVELS)),
    "state_dir": _Setting("state_dir", lambda w, n, k: w.absolute_path(n, k), nullable=True),
    "listen": _Setting("listen", lambda w, n, k: w.listen(n, k), nullable=True),
    "api_token": _Setting("api_token", lambda w, n, k: w.secret(n, k), nullable=True),
}


# --------------------------------------------------------------------------- public API


_HOW_TO_CREATE = (
    f"copy config/config.yaml from the gpu-router source tree to {DEFAULT_CONFIG_PATH} and edit it, "
    f"or pass --config PATH"
)


def _compose(text: str) -> yaml.Node | None:
    """The YAML node tree, with line marks, through libyaml when it is there.

    libyaml is several times faster to start and parse than the pure-Python parser. Its error
    messages are worded differently, so a file it rejects is parsed again by the pure parser, whose
    messages (PyYAML's own) are the ones users see either way.
    """
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        try:
            return yaml.compose(text, Loader=fast)
        except yaml.YAMLError:
            pass
    return yaml.compose(text, Loader=yaml.SafeLoader)


def parse_config(text: str, path: str = "<string>", *, environ: Mapping[str, str] | None = None) -> Config:
    """Validate YAML ``text`` into a Config; ``path`` is only used in messages and ``Config.path``.

    ``environ`` supplies ``${VAR}`` in header values (default: ``os.environ``).
    """
    lines = _Lines(text)
    walker = _Walker(path, os.environ if environ is None else environ, lines)
    try:
        root = _compose(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        message = f"invalid YAML: {e.problem or e.context}"
        if e.context and e.problem and e.context_mark is not None:
            # PyYAML's own order and wording: "while parsing X at line N, expected Y".
            message = f"invalid YAML: {e.context} at line {lines.of(e.context_mark)}, {e.problem}"
        # No snippet of the file: the offending line might hold a header value.
        raise ConfigError(path, lines.of(mark) if mark else None, "", message) from None
    except yaml.reader.ReaderError as e:
        raise ConfigError(
            path, lines.at(e.position), "", f"invalid YAML: character #x{e.character:04x}: {e.reason}"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(path, None, "", f"invalid YAML: {type(e).__name__}") from None
    if root is None:
        raise ConfigError(path, None, "", "the file is empty; it must list at least nodes:")
    walker.prepare(root)
    return walker.top(root)


def load_config(path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file at ``path``; any problem is a ConfigError naming it."""
    shown = os.fspath(path)
    try:
        data = pathlib.Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigNotFound(shown, None, "", f"no such file; {_HOW_TO_CREATE}") from None
    except IsADirectoryError:
        raise ConfigError(shown, None, "", "is a directory, not a config file") from None
    except OSError as e:
        raise ConfigError(shown, None, "", f"cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(shown, line, "", "not valid UTF-8 text") from None
    return parse_config(text, shown, environ=environ)


def _exists(path: pathlib.Path) -> bool:
    """True when something is there; a permission problem counts, so that loading reports it."""
    try:
        path.stat()
    except PermissionError:
        return True
    except (OSError, ValueError):
        return False
    return True


def find_config_path(
    explicit: str | None,
    environ: Mapping[str, str] = os.environ,
    *,
    default_path: str | os.PathLike[str] = DEFAULT_CONFIG_PATH,
) -> pathlib.Path:
    """The config file to load: ``--config``, ``$GPU_ROUTER_CONFIG``,
    ``$CONFIGURATION_DIRECTORY/config.yaml``, then ``default_path``.

    A path given explicitly (argument or variable) must exist; it is never silently replaced by a fallback.
    Raises ConfigNotFound saying where it looked and how to create a config.
    """
    if explicit:
        candidate = pathlib.Path(explicit)
        if not _exists(candidate):
            raise ConfigNotFound(explicit, None, "", "no such file (given with --config)")
        return candidate
    from_env = environ.get(CONFIG_ENV, "")
    if from_env:
        candidate = pathlib.Path(from_env)
        if not _exists(candidate):
            raise ConfigNotFound(from_env, None, "", f"no such file (given by ${CONFIG_ENV})")
        return candidate
    looked: list[str] = []
    for directory in environ.get("CONFIGURATION_DIRECTORY", "").split(":"):
        if directory:
            candidate = pathlib.Path(directory) / "config.yaml"
            if _exists(candidate):
                return candidate
            looked.append(str(candidate))
    default = pathlib.Path(default_path)
    if _exists(default):
        return default
    looked.append(str(default))
    raise ConfigNotFound(
        "",
        None,
        "",
        f"no config file found (looked in {', '.join(looked)}); "
        f"copy config/config.yaml from the gpu-router source tree to {default} and edit it, "
        f"or pass --config PATH (or set ${CONFIG_ENV})",
    )


def _writable_dir(path: pathlib.Path) -> bool:
    """True when ``path`` is a writable directory, or could be created as one."""
    if path.is_dir():
        return os.access(path, os.W_OK | os.X_OK)
    if path.exists():
        return False
    parent = path.parent
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def default_state_dir(
    config: Config,
    environ: Mapping[str, str] = os.environ,
    *,
    system_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
) -> pathlib.Path:
    """Where learned state lives: ``config.state_dir``, ``$STATE_DIRECTORY`` (first entry), ``system_dir``
    when writable, else ``$XDG_STATE_HOME/gpu-router`` or ``~/.local/state/gpu-router``. Creates nothing.
    """
    if config.state_dir:
        return pathlib.Path(config.state_dir)
    for entry in environ.get("STATE_DIRECTORY", "").split(":"):
        if entry:
            return pathlib.Path(entry)
    system = pathlib.Path(system_dir)
    if _writable_dir(system):
        return system
    xdg = environ.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore a relative value
        return pathlib.Path(xdg) / "gpu-router"
    home = environ.get("HOME") or str(pathlib.Path.home())
    return pathlib.Path(home) / ".local" / "state" / "gpu-router"
