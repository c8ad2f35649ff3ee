"""make_gpu_source for every GpuSpec kind, AutoSource, and hostinfo.is_local_host."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pynvml
import pytest

from gpu_router import hostinfo
from gpu_router.config import GpuSpec, NodeConfig
from gpu_router.gpus import (
    REMOTE_AUTO_ERROR,
    AmdSysfsSource,
    AutoSource,
    ExporterSource,
    GpuSource,
    NoGpuSource,
    NvmlSource,
    StaticSource,
    UnknownSource,
    make_gpu_source,
)
from gpu_router.gpus.kinds import Builder
from gpu_router.hostinfo import is_local_host
from gpu_router.state import GIB, Gpu, GpuReading, VramSource


class MarkerSource:
    """Stands in for a local source so a test can see which one the factory chose and when it is closed."""

    def __init__(self, reading: GpuReading | None = None, kind: VramSource = VramSource.NVML) -> None:
        self.kind = kind
        self.reading = reading if reading is not None else GpuReading(kind, (Gpu(0, "marker", 8 * GIB),))
        self.reads = 0
        self.closed = False

    def read(self) -> GpuReading:
        self.reads += 1
        return self.reading

    def close(self) -> None:
        self.closed = True


def node(url: str = "http://gpu01:11434", **gpu: Any) -> NodeConfig:
    return NodeConfig(name="n", url=url, gpu=GpuSpec(**gpu))


def never_local(host: str) -> bool:
    raise AssertionError(f"is_local must not be consulted, got {host!r}")


def builders(**sources: GpuSource) -> dict[str, Builder]:
    """Factory overrides that hand out the given sources by kind name."""
    return {name: (lambda spec, timeout_s, s=source: s) for name, source in sources.items()}


def test_nvml_kind_uses_the_nvml_builder() -> None:
    marker = MarkerSource()
    source = make_gpu_source(node(kind="nvml"), 5.0, builders=builders(nvml=marker), is_local=never_local)
    assert source is marker


def test_amd_kind_builds_an_amd_sysfs_source() -> None:
    source = make_gpu_source(node(kind="amd"), 5.0, is_local=never_local)
    assert isinstance(source, AmdSysfsSource)
    assert source.kind is VramSource.AMD


def test_exporter_kind_builds_an_exporter_source_with_url_and_timeout() -> None:
    source = make_gpu_source(
        node(kind="exporter", exporter_url="http://gpu01:9400/metrics"), 3.0, is_local=never_local
    )
    assert isinstance(source, ExporterSource)
    assert source.url == "http://gpu01:9400/metrics"
    assert source.timeout_s == 3.0
    source.close()


def test_exporter_kind_without_url_is_unknown_not_a_crash() -> None:
    source = make_gpu_source(node(kind="exporter"), 3.0, is_local=never_local)
    reading = source.read()
    assert reading.source is VramSource.UNKNOWN
    assert reading.error is not None
    assert "no exporter URL" in reading.error


def test_an_unknown_kind_name_is_unknown_not_a_crash() -> None:
    reading = make_gpu_source(node(kind="tpu"), 3.0, is_local=never_local).read()
    assert reading == GpuReading(VramSource.UNKNOWN, (), error="unknown GPU source kind 'tpu'")


def test_static_kind_reports_totals_only() -> None:
    source = make_gpu_source(node(kind="static", vram_bytes=(24 * GIB, 16 * GIB)), 5.0, is_local=never_local)
    assert isinstance(source, StaticSource)
    reading = source.read()
    assert reading.source is VramSource.STATIC
    assert reading.error is None
    assert [(g.index, g.name, g.total_bytes) for g in reading.gpus] == [
        (0, "static", 24 * GIB),
        (1, "static", 16 * GIB),
    ]
    assert all(g.used_bytes is None and g.free_bytes is None for g in reading.gpus)
    assert reading.total_bytes == 40 * GIB


def test_none_kind_is_a_cpu_only_node_without_error() -> None:
    source = make_gpu_source(node(kind="none"), 5.0, is_local=never_local)
    assert isinstance(source, NoGpuSource)
    assert source.read() == GpuReading(VramSource.NONE, (), error=None)


def test_auto_on_this_machine_tries_nvml_first_and_keeps_it() -> None:
    seen: list[str] = []

    def local(host: str) -> bool:
        seen.append(host)
        return True

    nvml, amd = MarkerSource(), MarkerSource(kind=VramSource.AMD)
    source = make_gpu_source(
        node("http://gpu01:11434"), 5.0, builders=builders(nvml=nvml, amd=amd), is_local=local
    )
    assert isinstance(source, AutoSource)
    assert seen == ["gpu01"]
    assert source.kind is VramSource.UNKNOWN  # nothing chosen before the first read
    assert source.read() is nvml.reading
    assert source.kind is VramSource.NVML
    assert amd.reads == 0
    assert amd.closed, "the candidate not chosen is released"
    source.read()
    assert (nvml.reads, amd.reads) == (2, 0)
    source.close()
    assert nvml.closed


def test_auto_on_this_machine_falls_back_to_amd_when_nvml_finds_nothing() -> None:
    no_driver = GpuReading(
        VramSource.UNKNOWN, (), error="NVML: no NVIDIA driver (NVML Shared Library Not Found)"
    )
    nvml, amd = MarkerSource(no_driver), MarkerSource(kind=VramSource.AMD)
    source = make_gpu_source(
        node("http://127.0.0.1:11434"), 5.0, builders=builders(nvml=nvml, amd=amd), is_local=lambda h: True
    )
    assert source.read() is amd.reading
    assert source.kind is VramSource.AMD
    assert nvml.closed
    source.read()
    assert (nvml.reads, amd.reads) == (1, 2), "once AMD found GPUs, NVML is not asked again"


def test_auto_keeps_asking_until_a_driver_appears() -> None:
    nothing = GpuReading(VramSource.NVML, (), error="NVML: the driver reports no GPUs")
    nvml = MarkerSource(nothing)
    amd = MarkerSource(GpuReading(VramSource.UNKNOWN, (), error="AMD sysfs: no AMD GPU"), kind=VramSource.AMD)
    source = make_gpu_source(
        node("http://127.0.0.1:11434"), 5.0, builders=builders(nvml=nvml, amd=amd), is_local=lambda h: True
    )
    first = source.read()
    assert first == GpuReading(
        VramSource.UNKNOWN,
        (),
        error="no GPU found on this machine: NVML: the driver reports no GPUs; AMD sysfs: no AMD GPU",
    )
    nvml.reading = GpuReading(VramSource.NVML, (Gpu(0, "late", 8 * GIB),))
    assert source.read().gpus[0].name == "late"
    assert source.kind is VramSource.NVML


def test_auto_on_a_remote_node_is_unknown_and_says_how_to_configure() -> None:
    source = make_gpu_source(node("http://gpu02:11434"), 5.0, is_local=lambda host: False)
    assert isinstance(source, UnknownSource)
    reading = source.read()
    assert reading == GpuReading(VramSource.UNKNOWN, (), error=REMOTE_AUTO_ERROR)
    assert (
        reading.error
        == "no GPU source configured for remote node; set gpu: {exporter: URL} or {vram_mb: [...]}"
    )


def test_auto_passes_a_bare_ipv6_host_to_is_local() -> None:
    seen: list[str] = []
    make_gpu_source(node("http://[::1]:11434"), 5.0, is_local=seen.append)  # type: ignore[arg-type]
    assert seen == ["::1"]


def test_auto_local_without_any_driver_is_unknown_not_none(tmp_path: Path) -> None:
    class NoDriver:
        NVMLError = pynvml.NVMLError
        NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound

        def nvmlInit(self) -> None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    (tmp_path / "class" / "drm").mkdir(parents=True)
    source = make_gpu_source(
        node("http://127.0.0.1:11434"),
        5.0,
        builders={
            "nvml": lambda spec, t: NvmlSource(NoDriver()),  # type: ignore[arg-type]
            "amd": lambda spec, t: AmdSysfsSource(tmp_path),
        },
        is_local=lambda h: True,
    )
    reading = source.read()
    assert reading.source is VramSource.UNKNOWN
    assert reading.gpus == ()
    assert reading.error == (
        "no GPU found on this machine: NVML: no NVIDIA driver (NVML Shared Library Not Found); "
        f"AMD sysfs: no AMD GPU (vendor 0x1002) under {tmp_path}/class/drm"
    )


def test_default_builders_give_real_sources() -> None:
    source = make_gpu_source(node(kind="nvml"), 5.0)
    assert isinstance(source, NvmlSource)
    source.close()


# -- hostinfo ----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    hostinfo.clear_cache()
    yield
    hostinfo.clear_cache()


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST.", "127.0.0.1", "127.8.9.10", "::1", "[::1]", "0.0.0.0"]
)
def test_loopback_names_and_addresses_are_local(host: str) -> None:
    assert is_local_host(host) is True


def test_this_machines_hostname_is_local() -> None:
    assert is_local_host(socket.gethostname()) is True


def test_an_address_of_a_local_interface_is_local() -> None:
    addresses = [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    if not addresses:
        pytest.skip("no non-loopback IPv4 address on this machine")
    assert is_local_host(addresses[0]) is True


@pytest.mark.parametrize("host", ["192.0.2.1", "2001:db8::1", "", "  "])
def test_foreign_addresses_and_junk_are_not_local(host: str) -> None:
    assert is_local_host(host) is False


def test_a_name_resolving_to_loopback_is_local(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def fake(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "ollama-alias.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    assert is_local_host("ollama-alias.example") is True


def test_a_resolver_failure_is_remote(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "this-machine.example")
    assert is_local_host("gpu99.example") is False


def test_a_hanging_resolver_is_abandoned(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def hang(*args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "this-machine.example")
    try:
        assert is_local_host("slow-dns.example", timeout_s=0.2) is False
    finally:
        release.set()


def test_this_machines_fqdn_is_local_even_when_dns_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "gpu01.lab.example")
    assert is_local_host("GPU01.lab.example.") is True
    assert is_local_host("gpu02.lab.example") is False


def test_answers_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counting(host: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.7", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", counting)
    assert is_local_host("gpu07.example") is False
    assert is_local_host("GPU07.example") is False
    assert calls == ["gpu07.example"]
