"""Listening and request checks shared by the local HTTP servers (server, viewer)."""

import ipaddress
import json
import logging
import math
import socket
import sys
import warnings
from http.server import ThreadingHTTPServer
from urllib.parse import urlsplit

from . import _cli
from .errors import LoadError

DRAIN_BYTES = 64 << 20  # an oversized body up to this size is read and dropped
MAX_JSON_DEPTH = 64  # nesting of a request body; OpenAI's requests need under 20
TOO_DEEP = f"The JSON body nests lists and objects more than {MAX_JSON_DEPTH} levels deep."


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class JSONErrors:
    """A handler (with ``send_json``) whose every error is JSON in OpenAI's shape, which its clients
    show; also those http.server writes itself (an unknown method, an oversized header)."""

    headers = {}  # a request's, once read: http.server's errors can come first

    def send_error(self, code, message=None, explain=None):
        short, long = self.responses.get(code, ("Error", ""))
        self.close_connection = True
        self.send_error_json(code, f"{message or short}: {explain or long}")

    def send_error_json(self, status: int, message: str) -> None:
        kind = {403: "permission_error", 404: "not_found_error"}.get(status, "invalid_request_error")
        self.send_json({"error": {"message": message, "type": kind}}, status)


def check_origin(handler, allowed, what: str) -> None:
    """A page of another site (or one that rebinds its DNS name to 127.0.0.1) must
    not drive the local model; native apps and curl send no Origin."""
    origin = handler.headers.get("Origin")
    if not (origin is None or "*" in allowed or origin in allowed):
        raise RequestError(f"This web origin may not use the {what} (see --allowed-origins).", 403)


def read_json(handler, paths, limit: int, allowed, what: str):
    """(path, body) of a POST to one of ``paths``, read and parsed once: its size,
    origin and JSON checked, or a RequestError saying what is wrong."""
    length = handler.headers.get("Content-Length", "").strip()
    if not length.isdecimal():
        raise RequestError("A Content-Length header with the body's size in bytes is required.", 400 if length else 411)
    length = int(length)
    if length > limit:
        # Drop a body of sane size, so the client sees the reply; a larger one is never read.
        while 0 < length <= DRAIN_BYTES and (chunk := handler.rfile.read(min(length, 1 << 16))):
            length -= len(chunk)
        handler.close_connection = True
        raise RequestError(f"The request body is larger than {limit} bytes.", 413)
    raw = handler.rfile.read(length)  # before any refusal: a body left unread can reset the connection
    path = urlsplit(handler.path).path
    if path not in paths:
        raise RequestError(f"No such endpoint: POST {path}.", 404)
    check_origin(handler, allowed, what)
    try:  # standard JSON only: Python's parser also takes NaN and Infinity
        body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(f"The body is not valid JSON: {e}.") from None
    except RecursionError:  # deeper than Python's parser goes
        raise RequestError(TOO_DEEP) from None
    if too_deep(body):
        raise RequestError(TOO_DEEP)
    return path, body


def _no_constant(name):
    raise ValueError(f"{name} is not allowed in JSON")


def too_deep(value) -> bool:
    """Whether lists and objects nest in ``value`` more than MAX_JSON_DEPTH levels, level by level."""
    level = [value]
    for _ in range(MAX_JSON_DEPTH):
        level = [v for x in level if isinstance(x, (list, dict)) for v in (x.values() if isinstance(x, dict) else x)]
    return any(isinstance(x, (list, dict)) for x in level)


def number(body: dict, key: str, low=-math.inf, high=math.inf, integer=False):
    """``body[key]`` if absent or a finite number (an integer if asked) in [low, high]."""
    v = body.get(key)
    ok = isinstance(v, int if integer else (int, float)) and not isinstance(v, bool)
    if v is not None and not (ok and math.isfinite(v) and low <= v <= high):
        span = f"at least {low}" if high == math.inf else f"from {low} to {high}"
        raise RequestError(f"{key} must be {'an integer' if integer else 'a number'} {span}, got {v!r}.")
    return v


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address.split("%")[0]).is_loopback


def bind(host: str, port: int) -> ThreadingHTTPServer:
    """A listening HTTP server (IPv4 or IPv6, as the host resolves), before any model loads."""

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # connections waiting (the kernel caps it); socketserver's 5 resets a burst

        def handle_error(self, request, client_address):
            # A client that leaves early is routine: one line, not a traceback.
            if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # BrokenPipe, reset, aborted
                logging.info("client %s disconnected", client_address[0])
            else:
                super().handle_error(request, client_address)

    try:  # as mlx-lm's server: the family of the host's first address
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        Server.address_family, *_, address = info
        return Server(address, None)
    except OSError as e:  # an unknown host, a busy port
        raise LoadError(f"Cannot listen on {host}:{port}: {e.strerror or e}.") from None


def url(httpd, host: str) -> str:
    """The server's base URL, warning first if ``host`` lets other machines in."""
    bound, port = httpd.server_address[:2]
    if not is_loopback(bound):
        warnings.warn(f"Listening on {host}, not only this machine: anyone who can reach "
                      f"port {port} can use the model, without authentication.")
    return f"http://[{bound}]:{port}" if ":" in bound else f"http://{bound}:{port}"


def add_flags(p, port: int, what: str, origins_example: str) -> None:
    """--host, --port, --allowed-origins and --max-request-bytes, the same for every server."""
    p.add_argument("--host", default="127.0.0.1", help=f"Address to listen on (default: 127.0.0.1, this machine only). Anything else lets other machines use the model; the {what} warns.")
    p.add_argument("--port", type=_cli.int_range(0, 65535), default=port, help=f"Port to listen on; 0 picks a free one (default: {port}).")
    p.add_argument("--max-request-bytes", type=_cli.positive_int, default=1 << 20, help="Refuse request bodies larger than this many bytes (default: 1048576).")
    p.add_argument(
        "--allowed-origins", type=lambda s: [o for o in s.split(",") if o], default=[],
        help=f"Comma-separated web origins (e.g. {origins_example}, or '*') whose pages may use the {what} "
        "from a browser (default: none; native apps and curl send no Origin and are always served).",
    )  # fmt: skip
