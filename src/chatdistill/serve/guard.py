"""What runs before any route: the Host check, the API key, the body size limit, and the security
headers every response carries.

The Host check stops DNS rebinding: a web page on an attacker's domain that re-points its name to
127.0.0.1 can make a browser send requests to a keyless loopback server, but the browser still
sends the attacker's name as Host, so a server that answers only to the names it is bound under
turns them away. An IP literal cannot be rebound, so a wildcard bind (0.0.0.0) answers to any.
"""

import hmac
import ipaddress
from collections.abc import Iterable

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatdistill.serve.errors import APIError
from chatdistill.serve.metrics import ServerMetrics

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})

# The page loads its script, style and API from this server only, and may not be framed.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        b"img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)


class HostPolicy:
    """The Host header names a server bound to `bind_host` answers to: the bound name, the
    loopback names for a loopback or wildcard bind, any IP literal for a wildcard bind, and the
    operator's `allowed` names ("*" turns the check off, e.g. behind a proxy that checks)."""

    def __init__(self, bind_host: str, allowed: Iterable[str] = ()) -> None:
        bind = _normalise(bind_host)
        extra = {_normalise(name) for name in allowed}
        self.any_host = "*" in extra
        self.wildcard = bind in _WILDCARDS
        self.names = frozenset(extra | {bind})
        if self.wildcard or _is_loopback(bind):
            self.names |= LOOPBACK_NAMES

    def allows(self, host_header: str | None) -> bool:
        if self.any_host:
            return True
        if not host_header:
            return False
        name = _normalise(_strip_port(host_header))
        return name in self.names or (self.wildcard and _is_ip(name))


def _strip_port(host: str) -> str:
    if host.startswith("["):  # [::1]:8000
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() and ":" not in name else host


def _normalise(name: str) -> str:
    return name.strip().strip("[]").rstrip(".").lower()


class GuardMiddleware:
    """Checks that run before any route parses a body: the Host header, the API key on `/v1`
    routes (so an unauthenticated client cannot make the server read or validate anything) and
    the body size limit (the declared Content-Length, and the bytes actually received for chunked
    uploads). Every response, rejections included, gets `SECURITY_HEADERS`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        hosts: HostPolicy,
        api_key: str | None,
        max_body_bytes: int,
        metrics: ServerMetrics,
    ) -> None:
        self.app = app
        self.hosts = hosts
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        rejection = self._check(dict(scope["headers"]), scope["path"])
        if rejection is not None:
            self.metrics.rejected.labels(status=str(rejection.status)).inc()
            await rejection.response()(scope, receive, send_with_headers)
            return

        received = 0

        async def counting_receive() -> Message:
            # A body without Content-Length (chunked) is counted as it arrives; FastAPI passes an
            # HTTPException raised while it reads the body on to the error handlers unchanged.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise StarletteHTTPException(413, self._too_large().message)
            return message

        await self.app(scope, counting_receive, send_with_headers)

    def _check(self, headers: dict[bytes, bytes], path: str) -> APIError | None:
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.hosts.allows(host):
            return APIError(
                400,
                f"this server does not answer to the Host '{host}'; use the address it was "
                "started on, or start it with --allowed-host for this name",
                code="invalid_host",
            )
        if self.api_key is not None and path.startswith("/v1"):
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return APIError(
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        limit = self.max_body_bytes
        return APIError(
            413,
            f"request body is larger than the server's limit of {limit} bytes; send less text",
            code="request_too_large",
        )
