"""Flags and request checks shared by the local HTTP servers (repo_mlx.server, repo_mlx.viewer)."""

from . import _cli

DRAIN_BYTES = 64 << 20  # an oversized body up to this size is read and dropped


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def origin_allowed(origin, allowed) -> bool:
    """Whether a request with this Origin header (None: not from a web page) may be served.

    A page of another site (or one that rebinds its DNS name to 127.0.0.1)
    must not drive the local model.
    """
    return origin is None or "*" in allowed or origin in allowed


def read_body(handler, limit: int) -> bytes:
    """The body of ``handler``'s request, or a RequestError if it has none or is over ``limit`` bytes."""
    length = handler.headers.get("Content-Length")
    if length is None:
        raise RequestError("A Content-Length header is required.", 411)
    if not length.strip().isdecimal():
        raise RequestError("Content-Length must be a non-negative integer.")
    length = int(length)
    if length > limit:
        # Read and drop a body of sane size, so the client is not cut off
        # mid-send and sees the reply; a larger one is never read.
        if length <= DRAIN_BYTES:
            while length > 0 and (chunk := handler.rfile.read(min(length, 1 << 16))):
                length -= len(chunk)
        handler.close_connection = True
        raise RequestError(f"The request body is larger than {limit} bytes.", 413)
    return handler.rfile.read(length)


def add_flags(p, port: int, what: str, origins_example: str) -> None:
    """--host, --port, --allowed-origins and --max-request-bytes, the same for every server."""
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="Address to listen on (default: 127.0.0.1, this machine only). "
        f"Anything else lets other machines use the model; the {what} warns.",
    )
    p.add_argument("--port", type=_cli.int_range(0, 65535), default=port, help=f"Port to listen on; 0 picks a free one (default: {port}).")
    p.add_argument(
        "--max-request-bytes",
        type=_cli.positive_int,
        default=1 << 20,
        help="Refuse request bodies larger than this many bytes (default: 1048576).",
    )
    p.add_argument(
        "--allowed-origins",
        type=lambda s: [o for o in s.split(",") if o],
        default=[],
        help=f"Comma-separated web origins (e.g. {origins_example}, or '*') whose pages may "
        f"use the {what} from a browser (default: none; native apps and curl send no Origin "
        "and are always served).",
    )
