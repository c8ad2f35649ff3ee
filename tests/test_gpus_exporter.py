"""ExporterSource over real HTTP on 127.0.0.1, and the text-exposition parser underneath it."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_router.gpus import scrape
from gpu_router.gpus.exporter import ExporterSource, redact_url
from gpu_router.gpus.exporter_nvidia import interpret_dcgm, interpret_nvidia_smi
from gpu_router.gpus.scrape import PromParseError, Sample, parse_prometheus_text, parse_sample_line
from gpu_router.state import MIB, GpuReading, VramSource
from gpu_router.transport import HttpClient

FIXTURES = Path(__file__).parent / "fixtures" / "exporter"
TIMEOUT_S = 0.5


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    hang_before_headers: bool = False
    hang_mid_body: bool = False
    headers: dict[str, str] = field(default_factory=dict)


class ExporterServer:
    """A fake exporter: serves ``routes`` by path; the hang routes block until the test ends."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.probes: list[str] = []  # X-Probe header values received, in order
        self.paths: list[str] = []  # every path asked for, in order
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.paths.append(self.path)
                if "X-Probe" in self.headers:
                    server.probes.append(self.headers["X-Probe"])
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                if route.hang_before_headers:
                    server.release.wait(30)
                    return
                self.send_response(route.status)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(route.body)))
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if route.hang_mid_body:
                    self.wfile.write(route.body[:10])
                    self.wfile.flush()
                    server.release.wait(30)
                    return
                # a client that refuses the body at its cap hangs up: that is what the test wants
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(route.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def serve_file(self, path: str, fixture: str) -> str:
        self.routes[path] = Route(body=(FIXTURES / fixture).read_bytes())
        return self.url(path)

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[ExporterServer]:
    srv = ExporterServer()
    yield srv
    srv.stop()


def read(url: str, timeout_s: float = TIMEOUT_S) -> GpuReading:
    source = ExporterSource(url, timeout_s)
    try:
        return source.read()
    finally:
        source.close()


def err(reading: GpuReading) -> str:
    """The reading's error, which the test expects to be set."""
    assert reading.error is not None
    return reading.error


# -- real scrapes --------------------------------------------------------------------------------------


def test_dcgm_mib_families_with_spaces_sentinels_and_a_mig_row(server: ExporterServer) -> None:
    source = ExporterSource(server.serve_file("/metrics", "dcgm_fb_mib.prom"), TIMEOUT_S)
    reading = source.read()
    source.close()
    assert reading.source is VramSource.EXPORTER
    assert reading.error is None
    gpu0, gpu1 = reading.gpus  # the file lists GPU 1 first
    assert (gpu0.index, gpu0.name, gpu0.uuid) == (0, "NVIDIA L4", "GPU-604ac76c-d9cf-fef3-62e9-d92044ab6e52")
    # total = free + used + reserved; the MIG instance row (used 999) is ignored
    assert gpu0.total_bytes == (18467 + 4096 + 470) * MIB
    assert gpu0.free_bytes == 18467 * MIB
    assert gpu0.used_bytes == (4096 + 470) * MIB
    # GPU 1's reserved value is a DCGM sentinel: treated as missing, not as 8 EiB
    assert gpu1.index == 1
    assert gpu1.total_bytes == (12000 + 10563) * MIB
    assert gpu1.used_bytes == 10563 * MIB


def test_dcgm_byte_families_win_over_mib_twins(server: ExporterServer) -> None:
    reading = read(server.serve_file("/metrics", "dcgm_fb_bytes.prom"))
    assert reading.source is VramSource.EXPORTER
    gpu0, gpu1 = reading.gpus
    assert gpu0.total_bytes == 85_520_809_984  # DCGM_FI_DEV_FB_CAPACITY_BYTES
    assert gpu0.free_bytes == 64_238_911_488  # exact bytes, not the MiB-rounded twin 61262 MiB
    assert gpu0.used_bytes == 85_520_809_984 - 64_238_911_488
    # capacity is a sentinel: total falls back to free + used + reserved
    assert gpu1.total_bytes == 16_000_000_000 + 69_000_000_000 + 500_000_000
    assert gpu1.free_bytes == 16_000_000_000


def test_nvidia_gpu_exporter_two_gpus_join_name_and_index(server: ExporterServer) -> None:
    reading = read(server.serve_file("/metrics", "nvidia_gpu_exporter_two_gpus.prom"))
    assert reading.source is VramSource.EXPORTER
    assert reading.error is None
    h100, rtx = reading.gpus
    assert (h100.index, h100.name, h100.uuid) == (
        0,
        "NVIDIA H100 80GB HBM3",
        "22222222-0000-0000-0000-000000000000",
    )
    assert (h100.total_bytes, h100.free_bytes) == (85_520_809_984, 64_238_911_488)
    # used = total - free, so reserved counts as used (exporter "used" excludes it)
    assert h100.used_bytes == 85_520_809_984 - 64_238_911_488
    assert (rtx.index, rtx.name) == (1, "NVIDIA GeForce RTX 4080 SUPER")
    assert rtx.total_bytes == 17_171_480_576
    assert rtx.used_bytes == 17_171_480_576 - 16_093_544_448


# -- failures --------------------------------------------------------------------------------------------


def test_refused_port_is_unknown_with_connection_refused() -> None:
    # Bound but not listening: connections are refused, and no other test can take the port meanwhile.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/metrics"
        reading = read(url)
    assert reading.source is VramSource.UNKNOWN
    assert reading.gpus == ()
    assert reading.error == f"exporter {url}: connection refused"


def test_server_that_never_answers_times_out(server: ExporterServer) -> None:
    server.routes["/metrics"] = Route(hang_before_headers=True)
    url = server.url("/metrics")
    reading = read(url)
    assert reading.source is VramSource.UNKNOWN
    assert reading.error == f"exporter {url}: timed out after 0.5s waiting for the response headers"


def test_server_that_stalls_mid_body_times_out(server: ExporterServer) -> None:
    body = (FIXTURES / "dcgm_fb_mib.prom").read_bytes()
    server.routes["/metrics"] = Route(body=body, hang_mid_body=True)
    reading = read(server.url("/metrics"))
    assert reading.source is VramSource.UNKNOWN
    assert "timed out after 0.5s" in err(reading)


def test_http_500_is_unknown_with_the_status(server: ExporterServer) -> None:
    server.routes["/metrics"] = Route(status=500, body=b"collector failed")
    url = server.url("/metrics")
    reading = read(url)
    assert reading.source is VramSource.UNKNOWN
    assert reading.error == f"exporter {url}: HTTP 500 Internal Server Error"


def test_garbage_body_is_unknown_and_says_what_was_expected(server: ExporterServer) -> None:
    server.routes["/metrics"] = Route(body=b"<html><body>Welcome to nginx!</body></html>\n\x00\xff{{{")
    reading = read(server.url("/metrics"))
    assert reading.source is VramSource.UNKNOWN
    error = err(reading)
    assert "no GPU memory metrics" in error
    assert "DCGM_FI_DEV_FB_" in error
    assert "nvidia_smi_memory_" in error


def test_dcgm_without_framebuffer_families_is_unknown(server: ExporterServer) -> None:
    reading = read(server.serve_file("/metrics", "dcgm_readme_no_fb.prom"))
    assert reading.source is VramSource.UNKNOWN
    assert "no GPU memory metrics" in err(reading)
    assert "3 samples" in err(reading)


def test_only_sentinel_values_is_unknown_not_zero(server: ExporterServer) -> None:
    server.routes["/metrics"] = Route(
        body=b'DCGM_FI_DEV_FB_FREE{gpu="0",UUID="GPU-x"} 9223372036854775794\n'
        b'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-x"} NaN\n'
    )
    reading = read(server.url("/metrics"))
    assert reading.source is VramSource.UNKNOWN
    assert "dcgm-exporter reports no usable GPU memory" in err(reading)


def test_credentials_in_the_url_never_reach_the_error(server: ExporterServer) -> None:
    server.routes["/metrics"] = Route(status=503)
    port = server.httpd.server_address[1]
    reading = read(f"http://scraper:s3cret@127.0.0.1:{port}/metrics")
    assert reading.error == f"exporter http://127.0.0.1:{port}/metrics: HTTP 503 Service Unavailable"


def test_a_caller_client_is_used_and_left_open(server: ExporterServer) -> None:
    url = server.serve_file("/metrics", "dcgm_fb_mib.prom")
    client = HttpClient(server.url(""), headers={"X-Probe": "1"}, timeout_s=TIMEOUT_S)
    source = ExporterSource(url, TIMEOUT_S, client=client)
    assert len(source.read().gpus) == 2
    source.close()
    assert len(source.read().gpus) == 2, "close() must not close a client it does not own"
    assert server.probes == ["1", "1"]
    client.close()


# -- interpretation details -------------------------------------------------------------------------------


def test_nvidia_smi_index_metric_is_used_without_gpu_info() -> None:
    samples, _ = parse_prometheus_text(
        'nvidia_smi_index{uuid="b"} 0\n'
        'nvidia_smi_index{uuid="a"} 1\n'
        'nvidia_smi_memory_total_bytes{uuid="a"} 1.6e+10\n'
        'nvidia_smi_memory_free_bytes{uuid="a"} 1e+10\n'
        'nvidia_smi_memory_total_bytes{uuid="b"} 8e+09\n'
        'nvidia_smi_memory_used_bytes{uuid="b"} 2e+09\n'
        'nvidia_smi_memory_reserved_bytes{uuid="b"} 1e+09\n'
    )
    match = interpret_nvidia_smi(samples)
    gpus = match.gpus
    assert match.problems == ()
    assert match.seen == 5
    assert [(g.index, g.uuid) for g in gpus] == [(0, "b"), (1, "a")]
    assert gpus[0].name == "GPU 0"
    # no free figure: free = total - used - reserved
    assert gpus[0].free_bytes == 5_000_000_000
    assert gpus[0].used_bytes == 3_000_000_000


def test_mig_only_dcgm_scrape_explains_itself() -> None:
    samples, _ = parse_prometheus_text(
        'DCGM_FI_DEV_FB_FREE{gpu="0",UUID="GPU-x",GPU_I_PROFILE="1g.10gb",GPU_I_ID="7"} 9000\n'
    )
    match = interpret_dcgm(samples)
    assert match.gpus == ()
    assert match.seen == 1
    assert match.problems == ("only MIG instance memory is exported; MIG partitions are not supported",)


def test_dcgm_total_only_gives_total_with_unknown_usage() -> None:
    samples, _ = parse_prometheus_text('DCGM_FI_DEV_FB_TOTAL{gpu="2",modelName="NVIDIA A10"} 23028\n')
    (gpu,) = interpret_dcgm(samples).gpus
    assert (gpu.index, gpu.name, gpu.total_bytes) == (2, "NVIDIA A10", 23028 * MIB)
    assert gpu.used_bytes is None
    assert gpu.free_bytes is None


# -- the parser ------------------------------------------------------------------------------------------


def test_parser_handles_escapes_spaces_timestamps_and_special_values() -> None:
    text = (
        '# HELP x a help line with {braces} and "quotes"\n'
        "# TYPE x gauge\n"
        '  x{a="q\\"uote", b="back\\\\slash",c="new\\nline", d="comma,}brace",} 1.6e+10 1712345678000\n'
        "y NaN\n"
        "z{} +Inf\n"
        "w -1e-3\n"
        "# EOF\n"
    )
    samples, bad = parse_prometheus_text(text)
    assert bad == 0
    x, y, z, w = samples
    assert x.name == "x"
    assert dict(x.labels) == {"a": 'q"uote', "b": "back\\slash", "c": "new\nline", "d": "comma,}brace"}
    assert x.value == 1.6e10
    assert y.value != y.value  # NaN
    assert z.value == float("inf")
    assert dict(z.labels) == {}
    assert w.value == -0.001


@pytest.mark.parametrize(
    "line",
    [
        "1bad 1",
        'x{a="unterminated} 1',
        "x{a=1} 1",
        'x{="v"} 1',
        'x{a="v" b="w"} 1',
        "x",
        "x one",
        "x 1 2 3",
    ],
)
def test_parser_rejects_malformed_lines(line: str) -> None:
    with pytest.raises(PromParseError):
        parse_sample_line(line)
    assert parse_prometheus_text(f"ok 1\n{line}\n") == ([parse_sample_line("ok 1")], 1)


def test_body_over_the_cap_is_unknown(server: ExporterServer) -> None:
    url = server.serve_file("/metrics", "nvidia_gpu_exporter_two_gpus.prom")
    source = ExporterSource(url, TIMEOUT_S, max_body_bytes=1000)
    reading = source.read()
    source.close()
    assert reading.source is VramSource.UNKNOWN
    assert "is over the 1000 bytes cap" in err(reading)


def test_default_cap_is_4_mib(server: ExporterServer) -> None:
    line = b"# HELP padding " + b"x" * 1000 + b"\n"
    server.routes["/metrics"] = Route(body=line * 4300)  # 4.4 MB
    assert "over the 4 MiB cap" in err(read(server.url("/metrics")))


def test_redirect_is_not_followed(server: ExporterServer) -> None:
    server.serve_file("/real", "dcgm_fb_mib.prom")
    server.routes["/metrics"] = Route(status=302, headers={"Location": "/real?token=x"})
    reading = read(server.url("/metrics"))
    assert reading.source is VramSource.UNKNOWN
    assert err(reading).endswith(f"redirect refused: HTTP 302 to {server.url('/real')}")
    assert server.paths == ["/metrics"]


def test_stray_bytes_do_not_hide_the_gpus(server: ExporterServer) -> None:
    body = b"# HELP junk caf\xe9 \xff\xfe\n" + (FIXTURES / "dcgm_fb_mib.prom").read_bytes()
    server.routes["/metrics"] = Route(body=body)
    reading = read(server.url("/metrics"))
    assert reading.source is VramSource.EXPORTER
    assert len(reading.gpus) == 2


_label_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)


@given(value=_label_text)
def test_any_escaped_label_value_round_trips(value: str) -> None:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    sample = parse_sample_line(f'm{{k="{escaped}", other="x"}} 3')
    assert sample.labels["k"] == value
    assert sample.labels["other"] == "x"


def test_redact_url_keeps_host_port_and_path() -> None:
    assert redact_url("http://u:p@[::1]:9400/metrics?x=1") == "http://[::1]:9400/metrics?x=1"
    assert redact_url("http://h:9400/metrics") == "http://h:9400/metrics"


# -- utilization, temperature and health --------------------------------------------------------------------


def test_which_exporter_matched_is_in_the_reading(server: ExporterServer) -> None:
    assert read(server.serve_file("/a", "dcgm_fb_mib.prom")).detail == "dcgm-exporter"
    assert read(server.serve_file("/b", "nvidia_gpu_exporter_two_gpus.prom")).detail == "nvidia_gpu_exporter"


def test_dcgm_utilization_and_temperature() -> None:
    samples, _ = parse_prometheus_text(
        'DCGM_FI_DEV_FB_FREE{gpu="0",UUID="GPU-a"} 1000\n'
        'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-a"} 3000\n'
        'DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-a"} 42\n'
        'DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-a"} 67\n'
        'DCGM_FI_DEV_FB_FREE{gpu="1",UUID="GPU-b"} 1000\n'
        'DCGM_FI_DEV_FB_USED{gpu="1",UUID="GPU-b"} 0\n'
        'DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-b"} 9223372036854775794\n'
        'DCGM_FI_DEV_GPU_TEMP{gpu="1",UUID="GPU-b"} 0\n'
        'DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-a",GPU_I_PROFILE="1g.10gb",GPU_I_ID="7"} 99\n'
    )
    a, b = interpret_dcgm(samples).gpus
    assert (a.utilization_ratio, a.temperature_c) == (0.42, 67.0)
    # a sentinel and a 0 C sensor are unknown, not 0
    assert (b.utilization_ratio, b.temperature_c) == (None, None)


def test_dcgm_fixture_utilization_zero_is_kept(server: ExporterServer) -> None:
    gpu0, gpu1 = read(server.serve_file("/metrics", "dcgm_fb_mib.prom")).gpus
    assert gpu0.utilization_ratio == 0.0  # DCGM_FI_DEV_GPU_UTIL 0: idle
    assert gpu1.utilization_ratio is None  # not exported for GPU 1
    assert gpu0.temperature_c is None  # only the memory temperature (a sentinel) is in the file


def test_real_nvidia_gpu_exporter_scrape_has_utilization_and_temperature(server: ExporterServer) -> None:
    reading = read(server.serve_file("/metrics", "nvidia_gpu_exporter_h100_load.prom"))
    (gpu,) = reading.gpus
    assert (gpu.name, gpu.utilization_ratio, gpu.temperature_c) == ("NVIDIA H100 80GB HBM3", 1.0, 59.0)
    assert gpu.healthy


def test_nvidia_gpu_exporter_two_gpus_utilization(server: ExporterServer) -> None:
    h100, rtx = read(server.serve_file("/metrics", "nvidia_gpu_exporter_two_gpus.prom")).gpus
    assert (h100.utilization_ratio, rtx.utilization_ratio) == (1.0, 0.0)
    assert (h100.temperature_c, rtx.temperature_c) == (None, None)


def dcgm_body(xid_gpu1: int, count_gpu1: int | None = None) -> bytes:
    rows = [
        'DCGM_FI_DEV_FB_FREE{gpu="0",UUID="GPU-a"} 1000',
        'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-a"} 1000',
        'DCGM_FI_DEV_XID_ERRORS{gpu="0",UUID="GPU-a"} 0',
        'DCGM_FI_DEV_FB_FREE{gpu="1",UUID="GPU-b"} 1000',
        'DCGM_FI_DEV_FB_USED{gpu="1",UUID="GPU-b"} 1000',
        f'DCGM_FI_DEV_XID_ERRORS{{gpu="1",UUID="GPU-b"}} {xid_gpu1}',
    ]
    if count_gpu1 is not None:
        rows.append(f'DCGM_EXP_XID_ERRORS_COUNT{{gpu="1",UUID="GPU-b",xid="31"}} {count_gpu1}')
        rows.append('DCGM_EXP_XID_ERRORS_COUNT{gpu="1",UUID="GPU-b",xid="13"} 1')
    return ("\n".join(rows) + "\n").encode()


def test_a_new_xid_between_scrapes_makes_that_gpu_unhealthy(server: ExporterServer) -> None:
    server.routes["/metrics"] = Route(body=dcgm_body(0))
    source = ExporterSource(server.url("/metrics"), TIMEOUT_S)
    try:
        assert [g.healthy for g in source.read().gpus] == [True, True]
        server.routes["/metrics"] = Route(body=dcgm_body(79))
        a, b = source.read().gpus
        assert a.healthy
        assert (b.healthy, b.health_reason) == (False, "new XID error 79 since the previous scrape")
        # the gauge keeps showing 79: no new error, but the GPU stays out for the hold period
        assert not source.read().gpus[1].healthy
    finally:
        source.close()


def test_an_old_xid_at_the_first_scrape_is_not_an_error(server: ExporterServer) -> None:
    server.routes["/metrics"] = Route(body=dcgm_body(48))
    assert [g.healthy for g in read(server.url("/metrics")).gpus] == [True, True]


def test_a_rising_xid_window_count_is_a_new_error(server: ExporterServer) -> None:
    server.routes["/metrics"] = Route(body=dcgm_body(31, count_gpu1=1))
    source = ExporterSource(server.url("/metrics"), TIMEOUT_S)
    try:
        assert source.read().gpus[1].healthy
        server.routes["/metrics"] = Route(body=dcgm_body(31, count_gpu1=2))
        gpu = source.read().gpus[1]
        assert (gpu.healthy, gpu.health_reason) == (False, "new XID error 31 since the previous scrape")
    finally:
        source.close()


@pytest.mark.parametrize("label", ["\u00b2", "1" * 5000, "-1", "nvidia\u00b3", ""])
def test_odd_gpu_index_labels_are_not_numbers(label: str) -> None:
    from gpu_router.gpus.scrape import int_label

    assert int_label(label) is None
    assert int_label("nvidia3") == 3
    assert int_label(" 7 ") == 7


_LINE_PARTS = st.sampled_from(
    ["m", "DCGM_FI_DEV_FB_USED", "a:b", "_x", "9", "{", "}", "=", '"', ",", " ", "\t", "\\", "\\n",
     '\\"', "gpu", "UUID", "1", "-2.5e3", "NaN", "+Inf", "x}y", "é", "\x0b", "1700000000000"]
)


@st.composite
def _sample_lines(draw: st.DrawFn) -> str:
    """Lines near the text format: well-formed ones often, with every kind of damage too."""
    if draw(st.booleans()):
        return "".join(draw(st.lists(_LINE_PARTS, max_size=14)))
    key = st.sampled_from(["gpu", "UUID", "k_1", "9a", "a:b", ""])
    value = st.sampled_from(["0", "NVIDIA A10", "x}y,z", "", 'q"', "a\\b", "é"])
    labels = draw(st.lists(st.tuples(key, value), max_size=3))
    gap = st.sampled_from(["", " ", "\t", "  "])
    block = ",".join(f'{draw(gap)}{k}{draw(gap)}={draw(gap)}"{v}"' for k, v in labels)
    if draw(st.booleans()):
        block += ","
    head = draw(st.sampled_from(["DCGM_FI_DEV_FB_FREE", "m", "a:b", "1m"]))
    body = f"{{{block}{draw(gap)}}}" if draw(st.booleans()) else ""
    tail = draw(st.sampled_from(["1", "23028", "-1e3", "NaN", "x", "", "1 1700000000000", "1 2 3"]))
    return f"{head}{draw(gap)}{body}{draw(gap)}{tail}{draw(gap)}"


@settings(max_examples=600, deadline=None)
@given(_sample_lines())
def test_the_fast_line_parser_agrees_with_the_scanner(line: str) -> None:
    # The regular expression takes the common lines; the scanner is the definition.
    def parsed(parse: Callable[[str], Sample]) -> tuple[str, dict[str, str], str] | str:
        try:
            sample = parse(line)
        except PromParseError as exc:
            return f"error: {exc}"
        return sample.name, dict(sample.labels), repr(sample.value)  # NaN != NaN, "nan" == "nan"

    fast, scanned = parsed(parse_sample_line), parsed(scrape._scan_sample_line)
    assert fast == scanned
