"""Server settings, shared by the app factory, the request handlers and the CLI."""

from dataclasses import dataclass


@dataclass
class ServeConfig:
    model_name: str
    """Name the model is served under (`model` in requests and in `/v1/models`)."""
    api_key: str | None = None
    """When set, every `/v1` route needs `Authorization: Bearer <api_key>`."""
    max_batch: int = 8
    """Requests decoded together in one batch (continuous batching)."""
    max_queue: int = 64
    """Requests allowed to wait for a batch slot; more are answered 429."""
    request_timeout_s: float = 300.0
    """Longest a request may take, queue time included; it is then cancelled and answered 504."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted; larger ones are answered 413."""
    default_max_tokens: int = 512
    """Chat answers are cut here when the request sets no max_completion_tokens / max_tokens."""
    host: str = "127.0.0.1"
    """The address the server is bound to; requests must name it (or a loopback name for a
    loopback or wildcard bind) in their Host header."""
    allowed_hosts: tuple[str, ...] = ()
    """More names the Host header may carry (e.g. the server's DNS name); "*" allows any."""
