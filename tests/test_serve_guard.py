"""Which Host headers a server answers to, for each kind of bind (the DNS-rebinding guard)."""

import pytest

from chatdistill.serve.guard import HostPolicy


@pytest.mark.parametrize(
    ("bind", "allowed", "host", "ok"),
    [
        ("127.0.0.1", (), "127.0.0.1:8000", True),
        ("127.0.0.1", (), "localhost:8000", True),
        ("127.0.0.1", (), "LocalHost.", True),
        ("127.0.0.1", (), "[::1]:8000", True),
        ("127.0.0.1", (), "evil.example:8000", False),
        ("127.0.0.1", (), "localhost.evil.example", False),
        ("127.0.0.1", (), "192.168.1.5:8000", False),
        ("127.0.0.1", (), "", False),
        ("127.0.0.1", (), None, False),
        ("::1", (), "[::1]", True),
        ("localhost", (), "127.0.0.1", True),
        ("192.168.1.5", (), "192.168.1.5:8000", True),
        ("192.168.1.5", (), "localhost:8000", False),
        ("192.168.1.5", ("chat.example",), "Chat.Example:8000", True),
        ("0.0.0.0", (), "10.0.0.7:8000", True),
        ("0.0.0.0", (), "[fe80::1]:8000", True),
        ("0.0.0.0", (), "localhost", True),
        ("0.0.0.0", (), "evil.example", False),
        ("::", ("chat.example",), "chat.example", True),
        ("127.0.0.1", ("*",), "anything.example", True),
    ],
)
def test_host_policy(bind, allowed, host, ok):
    assert HostPolicy(bind, allowed).allows(host) is ok
