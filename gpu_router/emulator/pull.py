"""``POST /api/pull`` as Ollama streams it: the status lines, their order, and its failures.

Sources: ``server/routes.go@v0.30.0`` PullHandler (``streamResponse``/``waitForStream``),
``server/images.go@v0.30.0`` PullModel, ``server/download.go@v0.30.0`` (``downloadBlob``,
``blobDownload.Wait``: a progress line every 60 ms) and ``internal/modelref`` (cloud names).

The order is ``pulling manifest``; for every layer (model, template, license, params, then the
config) ``pulling <digest[7:19]>`` lines with ``digest``, ``total`` and ``completed`` (both
``omitempty``); ``verifying sha256 digest``; ``writing manifest``; ``success``. A failure ends the
stream with ``{"error": ...}`` (HTTP 200 once a line was sent).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator

from gpu_router.emulator.catalogue import ModelSpec
from gpu_router.records import record

PROGRESS_INTERVAL_S = 0.06  # blobDownload.Wait ticker
MODELS_DIR = "/usr/share/ollama/.ollama/models"  # the Linux service's OLLAMA_MODELS
MANIFEST_NOT_FOUND = "pull model manifest: file does not exist"  # makeRequestWithRetry: 404 -> ErrNotExist
MAX_RETRIES = "max retries exceeded: unexpected EOF"  # download.go: errMaxRetriesExceeded wraps the cause

PULL_ERROR = "error"  # fail mid-stream after half the model blob
PULL_STALL = "stall"  # stop sending half-way, keep the connection, resume when the fault clears
PULL_NO_SPACE = "no_space"  # the blob write fails with ENOSPC


@record
class Layer:
    """One blob of a model's manifest."""

    digest: str  # sha256:<64 hex>
    size_bytes: int

    @property
    def short(self) -> str:
        """``digest[7:19]``: the 12 hex digits the status line shows."""
        return self.digest[7:19]


def normalize_pull_name(raw: str) -> tuple[str, bool]:
    """``modelref.NormalizePullName`` (internal/modelref@v0.30.0): ``x:cloud``/``x:tag:cloud``/
    ``x:tag-cloud`` become the legacy stub names ``x:cloud``/``x:tag-cloud``. Returns (name, cloud).
    """
    raw = raw.strip()
    idx = raw.rfind(":")
    if idx >= 0:
        suffix_raw = raw[idx + 1 :].strip()
        suffix = suffix_raw.lower()
        base = ""
        if suffix == "cloud":
            base = raw[:idx]
        elif "/" not in suffix_raw and suffix.endswith("-cloud"):
            base = raw[: idx + 1] + suffix_raw[: -len("-cloud")]
        if base:
            last_slash, last_colon = base.rfind("/"), base.rfind(":")
            return (base + "-cloud" if last_colon > last_slash else base + ":cloud"), True
        if suffix == "local":
            return raw[:idx], False
    return raw, False


def manifest_layers(spec: ModelSpec) -> list[Layer]:
    """The blobs of a model: weights (and projector), template, license, params, config last."""

    def digest(part: str) -> str:
        return "sha256:" + hashlib.sha256(f"{spec.name}/{part}".encode()).hexdigest()

    small = [("template", len(spec.template.encode()) or 1), ("license", len(spec.license.encode()) or 1)]
    if spec.is_cloud:
        return [Layer(digest("config"), spec.file_size_bytes)]
    weights = spec.file_size_bytes - spec.projector_bytes - sum(size for _, size in small) - 96 - 485
    layers = [Layer(digest("model"), max(1, weights))]
    if spec.projector_bytes:
        layers.append(Layer(digest("projector"), spec.projector_bytes))
    layers.extend(Layer(digest(name), size) for name, size in small)
    layers.append(Layer(digest("params"), 96))
    layers.append(Layer(digest("config"), 485))
    return layers


def pull_stream(
    spec: ModelSpec,
    *,
    installed: bool,
    speed_bps: float,
    fault: Callable[[], str | None],
    wait: Callable[[float], bool],
    install: Callable[[], None],
) -> Iterator[dict[str, object]]:
    """The progress objects of one pull, paced by ``speed_bps`` (0 = at once).

    ``fault()`` is asked as the stream goes (a pull fault set or cleared meanwhile takes effect);
    ``wait(s)`` sleeps and answers True when the server is stopping; ``install()`` puts the model
    on disk just before ``success``.
    """
    yield {"status": "pulling manifest"}
    for i, layer in enumerate(manifest_layers(spec)):
        if installed:
            # downloadBlob: a blob already on disk is one line with completed == total.
            yield _progress(layer, layer.size_bytes)
            continue
        done = 0
        last = time.monotonic()
        first = True
        half = layer.size_bytes // 2
        while done < layer.size_bytes:
            kind = fault() if i == 0 else None
            if kind is not None and done >= half:
                if kind == PULL_ERROR:
                    yield {"error": MAX_RETRIES}
                    return
                if kind == PULL_NO_SPACE:
                    yield {"error": _no_space(layer)}
                    return
                if wait(PROGRESS_INTERVAL_S):  # PULL_STALL: silent until cleared or stopped
                    return
                last = time.monotonic()
                continue
            if speed_bps <= 0:
                done = layer.size_bytes if kind is None or done >= half else max(half, 1)
            elif not first:
                if wait(PROGRESS_INTERVAL_S):
                    return
                now = time.monotonic()
                done = min(layer.size_bytes, done + max(1, int((now - last) * speed_bps)))
                last = now
            first = False
            yield _progress(layer, done)
    yield {"status": "verifying sha256 digest"}
    yield {"status": "writing manifest"}
    install()
    yield {"status": "success"}


def _progress(layer: Layer, completed: int) -> dict[str, object]:
    out: dict[str, object] = {"status": f"pulling {layer.short}", "digest": layer.digest}
    if layer.size_bytes:
        out["total"] = layer.size_bytes
    if completed:
        out["completed"] = completed
    return out


def _no_space(layer: Layer) -> str:
    # download.go writes to <blob>-partial; os.File.WriteAt reports "write <path>: <errno>".
    blob = layer.digest.replace(":", "-")
    return f"write {MODELS_DIR}/blobs/{blob}-partial: no space left on device"
