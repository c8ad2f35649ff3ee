"""What gpu-router keeps in its state directory across restarts: learned sizes and model metadata.

- **Learned sizes** (``learned-sizes.json``): what ``/api/ps`` showed for a model, keyed by
  everything that size depends on (model digest, context length, parallel slots, KV cache type,
  engine era), so a size seen at 128k context on one node is never applied at 4k on another.
- **Model metadata** (``model-info.json``): parsed ``/api/show`` answers by model digest, which never
  change for a digest, so a repeat report or a restart asks no node again.

Both are written atomically (temp file, fsync, rename), so a crash or a full disk never leaves a
half-written file, and read defensively: only a regular file, capped in size, any decoding or
parsing problem logged and the file rebuilt. Nothing here is ever fatal.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import stat
import threading
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpu_router import records
from gpu_router.config import Config, default_state_dir
from gpu_router.records import record
from gpu_router.state import ModelInfo

log = logging.getLogger(__name__)

FILE_NAME = "learned-sizes.json"
INFO_FILE_NAME = "model-info.json"
FORMAT_VERSION = 2
MAX_STATE_FILE_BYTES = 16 * 1024 * 1024  # far above what hundreds of models need


@record(order=True)
class SizeKey:
    """Everything an observed size depends on: the same key, the same size."""

    digest: str
    context_length: int
    num_parallel: int
    kv_cache_type: str
    era: str

    def describe(self) -> str:
        """For log lines and ``explain``."""
        return (
            f"digest {self.digest[:12]}, context {self.context_length} x {self.num_parallel},"
            f" KV {self.kv_cache_type}, {self.era}"
        )


def read_state_file(path: Path, what: str) -> bytes | None:
    """The bytes of a state file, or None (with a log line) when it is missing or unusable.

    Only a regular file is read, opened without blocking (a FIFO planted there must not hang the
    start) and never beyond the cap.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s %s: %s; starting empty", what, path, exc.strerror or exc)
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            log.warning("%s %s is not a regular file; ignoring it and writing a new one", what, path)
            return None
        if info.st_size > MAX_STATE_FILE_BYTES:
            log.warning("%s %s is larger than %d bytes; rebuilding it", what, path, MAX_STATE_FILE_BYTES)
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_STATE_FILE_BYTES + 1)[:MAX_STATE_FILE_BYTES]
    except OSError as exc:
        log.warning("cannot read %s %s: %s; starting empty", what, path, exc.strerror or exc)
        return None
    finally:
        os.close(fd)


def parse_state_json(raw: bytes, path: Path, what: str) -> Any:
    """Decoded JSON, or None (logged) when the bytes are not UTF-8 JSON of a sane depth."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else type(exc).__name__
        log.warning("%s %s is corrupt (%s); rebuilding it", what, path, reason)
        return None


def write_atomically(path: Path, data: object, what: str) -> bool:
    """Write JSON to ``path`` through a temp file and a rename; False (logged) on failure."""
    import tempfile  # here: a report that learns nothing new writes nothing and need not load it

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning("cannot save %s to %s: %s", what, path, exc.strerror or exc)
        return False
    return True


def _positive_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**62:
        return value
    return None


class SizeStore:
    """Learned sizes by :class:`SizeKey`, persisted as JSON."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sizes: dict[SizeKey, int] = {}
        self._dirty = False
        self._lock = threading.Lock()

    def load(self) -> Mapping[SizeKey, int]:
        """Read the file; a missing, old or corrupt one gives an empty store (and a log line)."""
        self.sizes = {}
        raw = read_state_file(self.path, "learned sizes")
        if raw is None:
            self._dirty = self.path.exists() or self.path.is_symlink()
            return self.sizes
        data = parse_state_json(raw, self.path, "learned sizes")
        if isinstance(data, dict) and data.get("version") == 1:
            # Version 1 keyed sizes by model name alone: a size seen at one context on one node was
            # applied everywhere. Those figures cannot be re-keyed, so they are dropped.
            log.warning(
                "learned sizes %s are from an older gpu-router (keyed by model name only); "
                "dropping them, they will be learned again",
                self.path,
            )
            self._dirty = True
            return self.sizes
        entries = (
            data.get("sizes") if isinstance(data, dict) and data.get("version") == FORMAT_VERSION else None
        )
        if not isinstance(entries, list):
            if data is not None:
                log.warning("learned sizes %s is corrupt (unexpected layout); rebuilding it", self.path)
            self._dirty = True
            return self.sizes
        for e in entries:
            key = _key_from_json(e)
            size = _positive_int(e.get("size_bytes")) if isinstance(e, dict) else None
            if key is not None and size is not None:
                self.sizes[key] = size
        self._dirty = len(self.sizes) != len(entries)
        return self.sizes

    def get(self, key: SizeKey) -> int | None:
        """The size learned for exactly this key."""
        return self.sizes.get(key)

    def learn(
        self,
        key: SizeKey,
        size_bytes: int,
        *,
        model: str,
        file_bytes: int | None,
        total_vram_bytes: int | None,
    ) -> bool:
        """Record a size seen in /api/ps; True when it changed. Sizes that cannot be right are ignored."""
        why = None
        if size_bytes <= 0:
            why = "not positive"
        elif file_bytes and size_bytes < file_bytes:
            why = f"below the model's file size ({file_bytes} bytes)"
        elif total_vram_bytes and size_bytes > total_vram_bytes:
            why = f"above the node's total VRAM ({total_vram_bytes} bytes)"
        if why is not None:
            log.info("not learning %d bytes for %s (%s): %s", size_bytes, model, key.describe(), why)
            return False
        with self._lock:
            if self.sizes.get(key) == size_bytes:
                return False
            self.sizes[key] = size_bytes
            self._dirty = True
        return True

    def save(self) -> bool:
        """Write the file atomically if anything changed; False (and a log line) on failure."""
        with self._lock:
            if not self._dirty:
                return True
            entries = [{**records.asdict(k), "size_bytes": v} for k, v in sorted(self.sizes.items())]
        ok = write_atomically(self.path, {"version": FORMAT_VERSION, "sizes": entries}, "learned sizes")
        if ok:
            self._dirty = False
        return ok


def _key_from_json(e: object) -> SizeKey | None:
    if not isinstance(e, dict):
        return None
    digest, kv, era = e.get("digest"), e.get("kv_cache_type"), e.get("era")
    ctx, par = _positive_int(e.get("context_length")), _positive_int(e.get("num_parallel"))
    if not (isinstance(digest, str) and isinstance(kv, str) and isinstance(era, str) and ctx and par):
        return None
    return SizeKey(digest, ctx, par, kv, era)


# ----------------------------------------------------------------------------- model metadata


@functools.cache
def _field_types(cls: type = ModelInfo) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _schema(cls: type = ModelInfo) -> str:
    """Changes when the fields of ModelInfo or of its parts change: a cache of another version is dropped."""
    parts = []
    for name, hint in _field_types(cls).items():
        nested = [a for a in (hint, *typing.get_args(hint)) if records.is_record(a)]
        inner = "".join(f"{{{_schema(a)}}}" for a in nested if isinstance(a, type))
        parts.append(f"{name}:{hint}{inner}")
    return ",".join(parts)


def _to_tuples(value: object) -> object:
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    return value


def info_to_json(info: ModelInfo) -> dict[str, Any]:
    """A ModelInfo as JSON-ready data (tuples become lists, its parts nested objects)."""
    return records.asdict(info)


class _Unfit(Exception):
    """A cached value does not fit the field it is for."""


def _decode(value: object, hint: Any) -> object:
    """A JSON-decoded value (lists already tuples) as the annotated type; raises _Unfit if it is not."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _decode(value, a)
            except _Unfit:
                continue
        raise _Unfit
    if hint is type(None):
        if value is None:
            return None
        raise _Unfit
    if origin is tuple:
        if not isinstance(value, tuple):
            raise _Unfit
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(v, args[0]) for v in value)
        if len(args) != len(value):
            raise _Unfit
        return tuple(_decode(v, a) for v, a in zip(value, args, strict=True))
    if isinstance(hint, type) and records.is_record(hint):
        # ModelInfo's parts (tensor summary, vision, projector, SSM sizes) are records too.
        if not isinstance(value, dict):
            raise _Unfit
        return _build(hint, value)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is str:
        ok = isinstance(value, str)
    else:
        ok = False  # a type this cache does not know how to check: ask the node again
    if not ok:
        raise _Unfit
    return value


def _build(cls: type, data: dict[str, Any]) -> Any:
    hints = _field_types(cls)
    if set(data) - set(hints):
        raise _Unfit
    values = {k: _decode(_to_tuples(v), hints[k]) for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError):
        raise _Unfit from None


def info_from_json(data: object) -> ModelInfo | None:
    """A ModelInfo back from :func:`info_to_json`, or None if the data does not fit its fields."""
    if not isinstance(data, dict):
        return None
    try:
        info = _build(ModelInfo, data)
    except _Unfit:
        return None
    return info if isinstance(info, ModelInfo) else None


class InfoCache:
    """Parsed ``/api/show`` answers by model digest, in memory and (with a path) on disk. Thread-safe."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._infos: dict[str, ModelInfo] = {}
        self._dirty = False
        self._lock = threading.Lock()
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        raw = read_state_file(path, "model metadata cache")
        if raw is None:
            return
        data = parse_state_json(raw, path, "model metadata cache")
        if not (
            isinstance(data, dict)
            and data.get("schema") == _schema()
            and isinstance(data.get("models"), dict)
        ):
            if data is not None:
                log.info("model metadata cache %s is from another version; asking the nodes again", path)
            self._dirty = True
            return
        for digest, entry in data["models"].items():
            info = info_from_json(entry)
            if isinstance(digest, str) and info is not None:
                self._infos[digest] = info

    def get(self, digest: str) -> ModelInfo | None:
        """The metadata of the model with this digest, if known."""
        return self._infos.get(digest)

    def put(self, digest: str, info: ModelInfo) -> None:
        """Remember a model's metadata."""
        with self._lock:
            if self._infos.get(digest) != info:
                self._infos[digest] = info
                self._dirty = True

    def __len__(self) -> int:
        return len(self._infos)

    def save(self) -> bool:
        """Write the cache if it has a path and changed."""
        if self.path is None:
            return True
        with self._lock:
            if not self._dirty:
                return True
            data = {
                "schema": _schema(),
                "models": {d: info_to_json(i) for d, i in sorted(self._infos.items())},
            }
            self._dirty = False
        ok = write_atomically(self.path, data, "model metadata cache")
        if not ok:
            with self._lock:
                self._dirty = True
        return ok


def store_for(config: Config) -> SizeStore:
    """The learned-size store in the config's state directory."""
    return SizeStore(default_state_dir(config) / FILE_NAME)


def info_cache_for(config: Config) -> InfoCache:
    """The model metadata cache in the config's state directory."""
    return InfoCache(default_state_dir(config) / INFO_FILE_NAME)


def load_learned(config: Config) -> Mapping[SizeKey, int]:
    """Read-only view of the learned sizes, for one-shot commands."""
    return store_for(config).load()
