"""An emulated GPU health fault takes that GPU out of placement; priority models on it fail over."""

from __future__ import annotations

from daemon_helpers import MakeDaemon, MakeNode, load_requests, pinned_on_gpu, settle

from gpu_router.planner import Verdict

LLAMA32 = "llama3.2:latest"
EMBED = "nomic-embed-text:latest"


def test_an_xid_error_fails_the_model_over_and_the_gpu_gets_nothing_new(
    make_node: MakeNode, make_daemon: MakeDaemon
) -> None:
    a = make_node("gpu-a", (8192,), (LLAMA32, EMBED))
    b = make_node("gpu-b", (8192,), (LLAMA32, EMBED))
    daemon = make_daemon([a, b], [LLAMA32])
    settle(daemon)
    assert pinned_on_gpu(a, LLAMA32)
    # dcgm-exporter reports XID 79 (fallen off the bus) on gpu-a's only GPU from now on: new since
    # the last scrape, so the GPU is unhealthy.
    loads_on_a = len(load_requests(a))
    a.raise_xid(0, 79)
    settle(daemon)
    state = daemon.telemetry.snapshot.state
    assert state is not None
    (gpu,) = state.node("gpu-a").gpu.gpus  # type: ignore[union-attr]
    assert gpu.healthy is False
    assert "79" in gpu.health_reason
    assert pinned_on_gpu(b, LLAMA32), "the priority model did not fail over off the sick GPU"
    p = daemon.telemetry.snapshot.every_model
    assert p is not None
    fits = {f.node: f for f in p.model(LLAMA32).fits}  # type: ignore[union-attr]
    assert fits["gpu-a"].verdict is Verdict.GPU_UNHEALTHY
    assert "XID" in fits["gpu-a"].reason or "79" in fits["gpu-a"].reason
    # Nothing new goes to the sick GPU either: every other model is judged unplaceable there.
    embed = {f.node: f.verdict for f in p.model(EMBED).fits}  # type: ignore[union-attr]
    assert embed == {"gpu-a": Verdict.GPU_UNHEALTHY, "gpu-b": Verdict.FITS}
    assert len(load_requests(a)) == loads_on_a, "a load was sent to the node with the sick GPU"
