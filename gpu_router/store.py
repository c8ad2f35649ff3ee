"""Learned model sizes, kept in the state directory across restarts.

What ``/api/ps`` showed for a model fully on GPU is the best figure there is, but it is only
visible while the model is loaded; remembering it lets the planner size a model that is loaded
nowhere right now. Writes are atomic (temp file, fsync, rename) so a crash or a full disk never
leaves a half-written file; a missing or corrupt file is logged and rebuilt, never fatal.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from gpu_router.config import Config, default_state_dir
from gpu_router.state import ClusterState, Processor

log = logging.getLogger(__name__)

FILE_NAME = "learned-sizes.json"
FORMAT_VERSION = 1


class SizeStore:
    """model name -> bytes it took fully on GPU, persisted as JSON."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sizes: dict[str, int] = {}
        self._dirty = False

    def load(self) -> dict[str, int]:
        """Read the file; a missing or corrupt one gives an empty store (and a log line)."""
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.sizes = {}
            return self.sizes
        except OSError as exc:
            log.warning("cannot read learned sizes %s: %s; starting empty", self.path, exc.strerror or exc)
            self.sizes = {}
            return self.sizes
        try:
            data = json.loads(raw)
            models = (
                data["models"] if isinstance(data, dict) and data.get("version") == FORMAT_VERSION else None
            )
            if not isinstance(models, dict):
                raise ValueError("unexpected layout")
            self.sizes = {
                str(k): int(v)
                for k, v in models.items()
                if isinstance(v, int) and not isinstance(v, bool) and v > 0
            }
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("learned sizes %s is corrupt (%s); rebuilding it", self.path, exc)
            self.sizes = {}
            self._dirty = True
        return self.sizes

    def learn_one(self, model: str, size_bytes: int) -> bool:
        """Record one model's size fully on GPU; True when it changed."""
        if size_bytes <= 0 or self.sizes.get(model) == size_bytes:
            return False
        self.sizes[model] = size_bytes
        self._dirty = True
        return True

    def learn(self, state: ClusterState) -> bool:
        """Record every model seen fully on GPU; True when something changed."""
        changed = False
        for node in state.nodes:
            for m in node.loaded if node.up else ():
                if m.processor is Processor.GPU:
                    changed |= self.learn_one(m.name, m.size_bytes)
        return changed

    def save(self) -> bool:
        """Write the file atomically if anything changed; False (and a log line) on failure."""
        if not self._dirty:
            return True
        data = {"version": FORMAT_VERSION, "models": dict(sorted(self.sizes.items()))}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".learned-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning("cannot save learned sizes to %s: %s", self.path, exc.strerror or exc)
            return False
        self._dirty = False
        return True


def store_for(config: Config) -> SizeStore:
    """The store in the config's state directory."""
    return SizeStore(default_state_dir(config) / FILE_NAME)


def load_learned(config: Config) -> Mapping[str, int]:
    """Read-only view of the learned sizes, for one-shot commands."""
    return store_for(config).load()
