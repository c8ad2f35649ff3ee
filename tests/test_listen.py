"""The listen address: parsing, the loopback rule config validation applies, local client hosts."""

from __future__ import annotations

import pytest

from gpu_router.listen import client_host, is_loopback, listen_problem, parse_listen, url_host


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (" localhost:1 ", ("localhost", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("[::1]:9464", ("::1", 9464)),
        ("[::]:80", ("::", 80)),
        ("gpu-router.lan:9464", ("gpu-router.lan", 9464)),
    ],
)
def test_parse_listen_accepts_host_and_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty address"),
        ("9464", "missing port"),
        (":9464", "missing host"),
        ("127.0.0.1:", "is not a number"),
        ("127.0.0.1:http", "is not a number"),
        ("127.0.0.1:0", "not in 1-65535"),
        ("127.0.0.1:70000", "not in 1-65535"),
        ("::1:9464", "[addr]:port"),
        ("[::1]9464", "[addr]:port"),
        ("[nope]:9464", "not an IPv6 address"),
        ("a b:9464", "not a host name"),
    ],
)
def test_parse_listen_rejects_with_a_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_listen(text)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("gpu-router.lan", False),  # a name is never assumed local
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_non_loopback_listen_needs_a_token() -> None:
    assert listen_problem(None, None) is None
    assert listen_problem("127.0.0.1:9464", None) is None
    assert listen_problem("0.0.0.0:9464", "s3cret") is None
    problem = listen_problem("0.0.0.0:9464", None)
    assert problem is not None
    assert "api_token" in problem
    bad = listen_problem("nonsense", "s3cret")
    assert bad is not None
    assert "missing port" in bad


def test_a_local_client_reaches_a_wildcard_listener_on_loopback() -> None:
    assert client_host("0.0.0.0") == "127.0.0.1"
    assert client_host("::") == "::1"
    assert client_host("10.1.2.3") == "10.1.2.3"
    assert url_host("::") == "[::1]"
    assert url_host("127.0.0.1") == "127.0.0.1"
