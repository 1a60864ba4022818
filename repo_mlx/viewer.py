"""Explore RePo positions in the browser: ``python -m repo_mlx.viewer --model ...``.

The official release's viewer (a Flask page with Plotly) in one local command, offline:
the page holds the plotly.js the ``plotly`` package ships, so nothing is fetched. Served
on loopback by default, with repo_mlx.server's origin check and body limit; with ``--html``
the page is one static file. Positions, ranges, summaries and outliers are computed in
Python (repo_mlx/position_stats.py); the page only draws them.
"""

import base64
import functools
import json
import math
import queue
import sys
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from . import _cli, http_checks
from .errors import LoadError, one_line
from .files import atomic_file
from .http_checks import RequestError
from .position_stats import inlier_range, outliers, select, summary, token_texts
from .rope import positions
from .limits import MAX_CONTEXTS, check_length, context_length
from .loader import architecture_name

PAGE = Path(__file__).with_name("viewer.html")


def plotly_js() -> str:
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise LoadError("The viewer needs plotly (it ships plotly.js): pip install 'repo-mlx[viewer]'.") from None
    return get_plotlyjs()


def page(data=None, js=None) -> str:
    """The viewer page; with ``data`` (from ``page_data``) it shows those positions without a server."""
    html = PAGE.read_text(encoding="utf-8")
    # Escaping every "<" keeps the JSON from closing its <script> element.
    payload = "" if data is None else json.dumps(data, ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")
    html = html.replace("/*DATA*/", payload, 1)
    js = (js or plotly_js()).replace("</script", "<\\/script")
    return html.replace("/*PLOTLY_JS*/", js, 1)


def page_data(z, tokens, layer="all", head="all", total=None, limit=None, model=None) -> dict:
    """What the page draws: the chosen heads' positions and, per head, ranges and summaries.

    ``z`` is ``{layer: array [1, heads, N]}`` as from ``positions``; the positions
    travel as base64 little-endian float32, exactly their values.
    """
    chosen = select(z, str(layer), str(head))
    heads = list(next(iter(chosen.values())))
    data = {
        "model": model,
        "tokens": tokens,
        "n": len(tokens),
        "total": total or len(tokens),
        "limit": limit,
        "layers": list(chosen),
        "heads": heads,
        "positions": {},
        "focused": {},
        "global": {},
        "summary": {},
        "outliers": {},
    }
    for l, per_head in chosen.items():
        rows = np.stack([per_head[h] for h in heads]).astype("<f4")
        key = str(l)
        data["positions"][key] = base64.b64encode(rows.tobytes()).decode("ascii")
        data["focused"][key] = [inlier_range(r) for r in rows]
        data["global"][key] = [inlier_range(r, full=True) for r in rows]
        # JSON has no NaN (a 1-token text has no "increasing").
        data["summary"][key] = [{k: v if math.isfinite(v) else None for k, v in summary(r).items()} for r in rows]
        data["outliers"][key] = [int(outliers(r).size) for r in rows]
    return data


def compute(model, tokenizer, text: str, limit: int, layer="all", head="all", name=None) -> dict:
    """``page_data`` for a text: its first ``limit`` tokens, positioned by ``model``."""
    ids = tokenizer.encode(text) if text.strip() else []
    if not ids:
        raise LoadError("The text is empty: type some text or drop a .txt file.")
    total, ids = len(ids), ids[:limit]
    check_length(model, len(ids), what="The text shown")
    z = {l: np.array(v) for l, v in positions(model, ids).items()}
    return page_data(z, token_texts(tokenizer, ids), layer, head, total, limit, name)


class Viewer:
    """One model, one text at a time, and the page it is served with.

    MLX arrays belong to the thread that made them, so the thread that loaded
    the model computes every text (``work_forever``) and the HTTP threads queue
    their texts for it: requests are served in turn.
    """

    def __init__(self, model, tokenizer, name, limit, max_request_bytes, origins, js):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.limit, self.max_request_bytes, self.origins = limit, max_request_bytes, origins
        self.page = page(None, js).encode("utf-8")
        self.jobs = queue.Queue()

    def work_forever(self) -> None:
        while True:
            try:
                future, args = self.jobs.get(timeout=0.5)  # a timeout keeps Ctrl-C working
            except queue.Empty:
                continue
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(compute(self.model, self.tokenizer, *args))
                except BaseException as e:
                    future.set_exception(e)

    def positions(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise RequestError('The request body must be a JSON object like {"text": "..."}.')
        text = body.get("text")
        if not isinstance(text, str):
            raise RequestError("text must be a string.")
        layer, head = body.get("layer", "all"), body.get("head", "all")
        for key, v in (("layer", layer), ("head", head)):
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise RequestError(f"{key} must be an integer or 'all'.")
        start = time.perf_counter()
        future = Future()
        self.jobs.put((future, (text, self.limit, layer, head, self.name)))
        try:
            data = future.result()
        except LoadError as e:  # empty text, unknown layer or head
            raise RequestError(str(e)) from None
        print(f"positions of {data['n']} tokens in {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)
        return data


class Handler(http_checks.JSONErrors, BaseHTTPRequestHandler):
    timeout = 60  # seconds a client may stall while sending; frees its thread

    def __init__(self, viewer: Viewer, *args, **kwargs):
        self.viewer = viewer
        super().__init__(*args, **kwargs)

    def log_message(self, format, *args):
        pass  # each computed text prints one line; errors reach the page

    def send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, obj, status: int = 200) -> None:
        self.send(status, json.dumps(obj, allow_nan=False).encode(), "application/json")

    def do_GET(self):
        path = urlsplit(self.path).path
        try:
            http_checks.check_origin(self, self.viewer.origins, "viewer")
            if path not in ("/", "/index.html"):
                raise RequestError(f"No such page: GET {path}.", 404)
            self.send(200, self.viewer.page, "text/html; charset=utf-8")
        except RequestError as e:
            self.send_error_json(e.status, str(e))

    def do_POST(self):
        v = self.viewer
        try:
            _, body = http_checks.read_json(self, ("/positions",), v.max_request_bytes, v.origins, "viewer")
            data = self.viewer.positions(body)
        except RequestError as e:
            message = str(e)
            if e.status == 413:
                message += " Use a shorter text, or start the viewer with a larger --max-request-bytes."
            self.send_error_json(e.status, message)
        except Exception as e:  # the server keeps serving whatever one text does
            self.send_error_json(500, f"Cannot compute the positions: {one_line(e)}")
        else:
            self.send_json(data)


def own_origins(host: str, bound: str, port: int) -> list:
    """The origins of the viewer's own page, which may call it whatever --allowed-origins says."""
    names = {host, bound}
    if http_checks.is_loopback(bound):
        names |= {"localhost", "127.0.0.1", "::1"}
    return [f"http://[{n}]:{port}" if ":" in n else f"http://{n}:{port}" for n in sorted(names)]


def build_parser():
    p = _cli.ArgumentParser(
        prog="python -m repo_mlx.viewer",
        description="Explore the positions a RePo model gives each token in a browser page, "
        "offline: token index against position for any layer and head, focused or global "
        "range, all heads of a layer, one head across layers, the plain-RoPE diagonal, and "
        "the text coloured by position. Serves the page locally, or writes it as one "
        "static file with --html. Needs plotly: pip install 'repo-mlx[viewer]'.",
    )
    _cli.add_model_flags(p, yarn=True, adapter=False)
    p.add_argument(
        "--max-tokens",
        type=_cli.positive_int,
        default=None,
        help="Show at most this many tokens of a text; longer ones are cut, with a warning "
        "on the page (default: the model's context, 4096 for the released models).",
    )
    http_checks.add_flags(p, 8000, "viewer", "http://myhost:8000")
    p.add_argument(
        "--html",
        type=_cli.output_file,
        default=None,
        help="Write the page with the positions of --prompt-file (or --prompt) to this file, "
        "self-contained (no server, no network), instead of serving.",
    )
    _cli.add_prompt_flags(p, "the text to show (with --html)")
    return p


def command(argv=None) -> None:
    args = build_parser().parse_args(argv)
    has_text = args.prompt is not None or args.prompt_file is not None
    if args.html is not None and not has_text:
        raise LoadError("--html needs the text to show: --prompt-file F (or --prompt TEXT).")
    if args.html is None and has_text:
        raise LoadError("--prompt/--prompt-file go with --html; the served page has its own text box.")
    js = plotly_js()  # before loading: a missing extra fails fast
    text = _cli.read_prompt(args)
    httpd = http_checks.bind(args.host, args.port) if args.html is None else None  # a busy port fails fast too
    try:
        model, tokenizer = _cli.load_from_args(args)
        if not model.args.repo_layers:
            raise LoadError(f"{args.model} has no RePo layers (plain {architecture_name(model)}): there are no positions to show.")
        context = context_length(model) or 4096
        limit = args.max_tokens or context
        if limit > MAX_CONTEXTS * context:
            raise LoadError(f"--max-tokens {limit} is more than {MAX_CONTEXTS} times the model's context of {context}, "
                            "past which RePo's positions are noise; pass at most " + str(MAX_CONTEXTS * context) + ".")

        if args.html is not None:
            data = compute(model, tokenizer, text, limit, name=args.model)
            cut = f" (the first of {data['total']})" if data["total"] > data["n"] else ""
            html = page(data, js)
            with atomic_file(args.html) as tmp:
                tmp.write_text(html, encoding="utf-8")
            print(f"{data['n']} tokens{cut}; wrote {args.html} ({len(html.encode()) / 1e6:.1f} MB)")
            return

        host, port = httpd.server_address[:2]
        origins = list(args.allowed_origins) + own_origins(args.host, host, port)
        viewer = Viewer(model, tokenizer, args.model, limit, args.max_request_bytes, origins, js)
        httpd.RequestHandlerClass = functools.partial(Handler, viewer)
        print(f"Serving {args.model} at {http_checks.url(httpd, args.host)}/ (Ctrl-C stops)", flush=True)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        viewer.work_forever()
    finally:
        if httpd is not None:
            httpd.server_close()


def main(argv=None) -> None:
    _cli.run(command, argv)


if __name__ == "__main__":
    main()
