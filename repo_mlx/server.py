"""OpenAI-compatible local server: ``python -m repo_mlx.server --model ...``.

mlx-lm's server does the work (request handler, batched generation, prompt
cache, server-sent events). This module adds what a RePo model and a desktop
app need on top of it:

- the model is loaded with ``repo_mlx.load`` (a stock loader would build plain
  OLMo-2 or refuse the position weights), once, at start; requests cannot make
  the server load other models, adapters or draft models;
- requests are checked before mlx-lm sees them: size, JSON, field types and
  ranges; a bad one gets a 4xx JSON error and never reaches the generation
  thread, where an exception would stop the server for everyone;
- ``stop`` strings end a reply where their text appears (mlx-lm alone stops
  only when the generated tokens equal the stop string's own tokenization);
- OpenAI's completions forms mlx-lm lacks: ``logprobs`` as the number of top
  tokens (reply with ``tokens``, ``token_logprobs``, ``top_logprobs``,
  ``text_offset``) and ``prompt`` as a list (one choice per prompt); chat
  logprobs name the chosen token, with its top alternatives; streamed events
  carry the logprobs of their tokens (mlx-lm's carry none);
- prompts longer than ``--max-prompt-tokens`` are refused before prefill,
  which pauses every other request;
- safe defaults: 127.0.0.1, no cross-origin browser access, a body size limit.

Chat with a base model (no chat template) uses mlx-lm's plain transcript,
``USER: ...`` / ``ASSISTANT:``, and ends the reply where the model starts
the next ``USER:`` turn.
"""

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import threading
import time
from io import BytesIO
from urllib.parse import unquote, urlsplit

from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START
from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache
from mlx_lm.server import (
    APIHandler,
    ModelProvider,
    ResponseGenerator,
    get_system_fingerprint,
)

from . import _cli, cache_prompt, http_checks
from .errors import LoadError, one_line
from .http_checks import RequestError
from .utils import add_model_flags, context_length, load_from_args

POST_PATHS = ("/v1/completions", "/v1/chat/completions", "/chat/completions")
# Where mlx-lm's plain chat transcript (convert_chat's default role mapping)
# starts the next user turn; a base model writes it when its reply is done.
NEXT_USER_TURN = "\nUSER:"
MAX_STOP_WORDS = 16
MAX_PROMPTS = 32  # of a completions request's list of prompts
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions
ERROR_TYPES = {403: "permission_error", 404: "not_found_error"}


@dataclasses.dataclass
class Limits:
    max_tokens: int  # largest max_tokens a request may ask for
    vocab_size: int  # logit_bias keys must be token ids below this
    max_request_bytes: int


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m repo_mlx.server",
        description="Serve a RePo-OLMo2 model over an OpenAI-compatible HTTP API "
        "(/v1/models, /v1/completions, /v1/chat/completions) built on mlx-lm's server.",
    )
    add_model_flags(p, yarn=True, required=True)
    http_checks.add_flags(p, 8080, "server", "http://localhost:3000")
    p.add_argument("--max-tokens", type=_cli.positive_int, default=512, help="max_tokens of requests that give none (default: 512).")
    p.add_argument(
        "--max-tokens-limit",
        type=_cli.positive_int,
        default=None,
        help="Refuse requests asking for more tokens than this "
        "(default: the model's context length, 4096 for the released models).",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=_cli.positive_int,
        default=None,
        help="Refuse prompts longer than this many tokens, the --prompt-cache-file document "
        "included (default: the model's context, with --yarn's factor). Processing a long "
        "prompt pauses every other request until it is done.",
    )
    p.add_argument("--prompt-cache-size", type=_cli.positive_int, default=10, help="KV caches of recent prompts kept for reuse (default: 10).")
    p.add_argument(
        "--prompt-cache-file",
        type=_cli.existing_file,
        default=None,
        help="A document's KV cache made by repo_mlx.cache_prompt for this model and --dtype: "
        "every request's prompt continues after the document, which is not processed again.",
    )
    p.add_argument("--temp", type=_cli.non_negative_float, default=0.0, help="Temperature of requests that give none; 0 is greedy (default: 0).")
    p.add_argument("--top-p", type=_cli.probability, default=1.0, help="top_p of requests that give none, 0 to 1 (default: 1, off).")
    p.add_argument("--top-k", type=_cli.non_negative_int, default=0, help="top_k of requests that give none (default: 0, off).")
    p.add_argument("--min-p", type=_cli.probability, default=0.0, help="min_p of requests that give none, 0 to 1 (default: 0, off).")
    _cli.add_trust_remote_code(p)
    p.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="Logging level; INFO logs every request (default: WARNING).",
    )
    return p


def mlx_lm_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """The settings mlx-lm's server reads, at its own defaults where we add no flag."""
    return argparse.Namespace(
        model=args.model,
        adapter_path=args.adapter_path,
        yarn=args.yarn,
        draft_model=None,
        num_draft_tokens=3,
        trust_remote_code=False,
        chat_template="",
        use_default_chat_template=False,
        chat_template_args={},
        allowed_origins=args.allowed_origins,
        temp=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        max_tokens=args.max_tokens,
        decode_concurrency=32,
        prompt_concurrency=8,
        prefill_step_size=2048,
        prompt_cache_size=args.prompt_cache_size,
        prompt_cache_bytes=None,
        kv_bits=None,
        kv_group_size=64,
        quantized_kv_start=DEFAULT_QUANTIZED_KV_START,
        pipeline=False,
        dtype=args.dtype,
    )


class RePoModelProvider(ModelProvider):
    """mlx-lm's model provider holding exactly one RePo model, loaded by repo_mlx."""

    def __init__(self, cli_args):
        super().__init__(cli_args)
        self.loaded = threading.Event()
        self.load_error = None

    def load_default(self):
        # Runs on mlx-lm's generation thread, so the model lives on its stream.
        try:
            a = self.cli_args
            self.model, self.tokenizer = load_from_args(a)
            self.processor = self.draft_model = None
            self.is_batchable = all(hasattr(c, "merge") for c in make_prompt_cache(self.model))
            self.model_key = (a.model, a.adapter_path, None)
        except Exception as e:
            self.load_error = e
        finally:
            self.loaded.set()

    def load(self, model_path=None, adapter_path=None, draft_model_path=None):
        # Requests name models too, but this server serves only the one it started with.
        return self.model, self.tokenizer


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(body, key, low, high):
    if key in body:
        v = body[key]
        if not _is_int(v) or not low <= v <= high:
            raise RequestError(f"{key} must be an integer from {low} to {high}, got {v!r}.")


def _check_number(body, key, low=-math.inf, high=math.inf):
    if key in body:
        v = body[key]
        if not _is_number(v) or not low <= v <= high:
            span = f"at least {low}" if high == math.inf else f"from {low} to {high}"
            raise RequestError(f"{key} must be a number {span}, got {v!r}.")


def _check_type(body, key, kind, name):
    if key in body and not isinstance(body[key], kind):
        raise RequestError(f"{key} must be {name}.")


def _message_text(i: int, content) -> str:
    """A message's content as one string; only text parts are supported."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise RequestError(
        f"messages[{i}].content must be a string or a list of text parts "
        '({"type": "text", "text": ...}); this model reads text only.'
    )


def check_request(body, path: str, limits: Limits, model_id: str, has_chat_template: bool) -> dict:
    """The request mlx-lm will serve, or a RequestError saying what is wrong.

    Null fields mean "use the default", as in OpenAI's API. mlx-lm's handler
    then checks the types and lower bounds it knows (stream, logprobs,
    top_logprobs, repetition_penalty, the *_context_size fields); these are
    the checks it lacks: booleans passed as numbers, infinities, upper limits,
    seeds, logit_bias keys, stop strings, messages, unsupported fields, and
    OpenAI's completions form of logprobs. A completions ``prompt`` may be a
    list of strings: ``prompts`` then holds them, one choice each.
    """
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    body = {k: v for k, v in body.items() if v is not None}

    _check_type(body, "model", str, "a string")
    for key in ("adapters", "draft_model"):
        if key in body:
            raise RequestError(f"{key} is not supported: the server runs the model and adapters it was started with.")
    for key, only in (("n", 1), ("best_of", 1), ("echo", False)):
        if key in body and body[key] != only:
            raise RequestError(f"{key} is not supported (only {json.dumps(only)}).")
    _check_type(body, "stream_options", dict, "an object")
    options = dict(body.get("stream_options", {}))
    _check_type(options, "include_usage", bool, "true or false")
    options.setdefault("include_usage", False)  # mlx-lm reads it unconditionally
    body["stream_options"] = options

    for key in ("max_tokens", "max_completion_tokens"):
        _check_int(body, key, 1, limits.max_tokens)
    _check_number(body, "temperature", 0)
    _check_number(body, "top_p", 0, 1)
    _check_number(body, "min_p", 0, 1)
    _check_int(body, "top_k", 0, limits.vocab_size)
    _check_int(body, "seed", 0, 2**64 - 1)  # what mx.random.seed accepts
    for key in ("presence_penalty", "frequency_penalty"):
        _check_number(body, key, -100, 100)
    for key in ("xtc_probability", "xtc_threshold"):
        _check_number(body, key, 0, 1)
        if key in body:
            body[key] = float(body[key])  # mlx-lm takes floats only
    _check_type(body, "chat_template_kwargs", dict, "an object")

    if "logit_bias" in body:
        bias = body["logit_bias"]
        ok = isinstance(bias, dict) and all(
            k.isdecimal() and int(k) < limits.vocab_size and _is_number(v) and -100 <= v <= 100
            for k, v in bias.items()
        )
        if not ok:
            raise RequestError(
                f"logit_bias must map token ids (0 to {limits.vocab_size - 1}) to numbers from -100 to 100."
            )

    stop = body.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not (
        isinstance(stop, list)
        and len(stop) <= MAX_STOP_WORDS
        and all(isinstance(w, str) and w for w in stop)
    ):
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP_WORDS} of them.")

    if path == "/v1/completions":
        prompt = body.get("prompt")
        prompts = prompt if isinstance(prompt, list) else [prompt]
        if not (
            0 < len(prompts) <= MAX_PROMPTS and all(isinstance(p, str) and p for p in prompts)
        ):
            raise RequestError(
                f"prompt must be a non-empty string or a list of at most {MAX_PROMPTS} of them."
            )
        if isinstance(prompt, list):
            if body.get("stream"):
                raise RequestError("A list of prompts is served whole, not streamed: drop stream, or send one request per prompt.")
            body["prompts"] = prompts
            body["prompt"] = prompts[0]
        if "logprobs" in body:
            # OpenAI's completions form: how many top tokens to list per token.
            n = body["logprobs"]
            if not _is_int(n) or not 0 <= n <= MAX_COMPLETION_LOGPROBS:
                raise RequestError(
                    f"logprobs must be an integer from 0 to {MAX_COMPLETION_LOGPROBS} on /v1/completions "
                    f"(the number of most likely tokens to list), got {n!r}."
                )
            if "top_logprobs" in body:
                raise RequestError("top_logprobs belongs to chat; on /v1/completions logprobs gives the count.")
            body["logprobs"], body["top_logprobs"] = True, n
    else:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list.")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(f"messages[{i}] must be an object with a string role.")
            clean.append({**m, "content": _message_text(i, m.get("content"))})
        body["messages"] = clean
        _check_type(body, "tools", list, "a list")
        mapping = body.get("role_mapping")
        if mapping is not None and not (
            isinstance(mapping, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())
        ):
            raise RequestError("role_mapping must map strings to strings.")
        if not has_chat_template and not mapping and NEXT_USER_TURN not in stop:
            stop = stop + [NEXT_USER_TURN]

    body["stop"] = stop
    body["model"] = model_id  # responses name the model that served them
    return body


def cut_at_stop(responses, stop_words):
    """End a stream of mlx-lm Responses where a stop string's text is complete.

    The last Response is cut just after the first stop string to complete;
    mlx-lm's handler strips the stop string and reports finish_reason "stop".
    """
    if not stop_words:
        yield from responses
        return
    text, longest = "", max(map(len, stop_words))
    for r in responses:
        start = max(0, len(text) - longest + 1)  # earlier text was searched already
        text += r.text
        ends = [i + len(w) for w in stop_words if (i := text.find(w, start)) >= 0]
        if ends:
            end = min(ends) - (len(text) - len(r.text))
            yield dataclasses.replace(r, text=r.text[:end], finish_reason=None)
            return
        yield r
        if r.finish_reason is not None:
            return


class RePoResponseGenerator(ResponseGenerator):
    """mlx-lm's generation thread, with stop strings matched on text.

    mlx-lm stops when the generated tokens equal a stop string's own
    tokenization, which misses it when the model spells it with other tokens
    (".\n\n" is one token, "\n\n" another), and drops text held back for
    another stop string on a match. Here tokens stop at EOS only, mlx-lm's text
    state machine still strips stop strings and holds back their prefixes, and
    ``cut_at_stop`` ends the reply.
    """

    def _make_state_machine(self, model_key, tokenizer, stop_words):
        eos_only, _ = super()._make_state_machine(model_key, tokenizer, [])
        _, text_sm = super()._make_state_machine(model_key, tokenizer, stop_words)
        return eos_only, text_sm

    def generate(self, request, args, progress_callback=None):
        try:
            ctx, responses = super().generate(request, args, progress_callback)
        except RequestError as e:  # a prompt over --max-prompt-tokens
            raise Refused(str(e)) from None
        return ctx, cut_at_stop(responses, args.stop_words)

    document = []  # tokens of --prompt-cache-file, before every prompt
    max_prompt_tokens = None

    def _tokenize(self, tokenizer, request, args):
        prompt, segments, *rest = super()._tokenize(tokenizer, request, args)
        if self.document:  # its cache is in the prompt cache: mlx-lm reuses it
            prompt, segments = self.document + prompt, [self.document + segments[0], *segments[1:]]
        if self.max_prompt_tokens is not None and len(prompt) > self.max_prompt_tokens:
            document = f" ({len(self.document)} of them the cached document)" if self.document else ""
            # Raised on the generation thread, which hands it to the request's handler.
            raise RequestError(
                f"The prompt is {len(prompt)} tokens{document}, more than this server's limit of "
                f"{self.max_prompt_tokens} (--max-prompt-tokens): shorten it."
            )
        return (prompt, segments, *rest)


class Handler(APIHandler):
    """mlx-lm's request handler behind a check of every request."""

    timeout = 60  # seconds a client may stall while sending; frees its thread

    def __init__(self, response_generator, settings, *args, **kwargs):
        self.settings = settings
        self.unsent = []  # a stream's Responses whose logprobs no event has carried yet
        super().__init__(Recording(response_generator, self.unsent), *args, **kwargs)

    def log_message(self, format, *args):
        logging.info("%s %s", self.address_string(), format % args)

    def send_error_json(self, status: int, message: str) -> None:
        # OpenAI's shape: its clients show error.message to the user.
        kind = ERROR_TYPES.get(status, "invalid_request_error")
        body = json.dumps({"error": {"message": message, "type": kind}}).encode()
        self._set_completion_headers(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        s = self.settings
        try:
            path, body = http_checks.read_json(
                self, POST_PATHS, s["limits"].max_request_bytes, s["allowed_origins"], "server"
            )
            body = check_request(body, path, s["limits"], s["model_id"], s["has_chat_template"])
        except RequestError as e:
            self.send_error_json(e.status, str(e))
            return
        self.path = path
        prompts = body.pop("prompts", None)
        try:
            if prompts is None:
                self.serve(body)
            else:
                self.serve_prompts(body, prompts)
        except Refused as e:
            self.send_error_json(400, str(e))

    def serve(self, body: dict, index: int = 0) -> None:
        """mlx-lm's handler on the checked body, which it reads and parses itself.

        mlx-lm 0.32's ``do_POST`` reads the socket, parses the JSON and sets its
        30-odd request attributes in one method, with no hook between parsing and
        use; handing it the checked body as bytes is the one way in that does not
        copy that block (and its defaults) here.
        """
        self.choice_index = index
        self.completion_logprobs = body.get("top_logprobs") if self.path == "/v1/completions" and body.get("logprobs") else None
        self.prompt_chars = len(body.get("prompt", ""))
        self.unsent.clear()
        original, self.rfile = self.rfile, BytesIO(raw := json.dumps(body).encode())
        self.headers.replace_header("Content-Length", str(len(raw)))
        try:
            super().do_POST()
        finally:
            self.rfile = original

    def serve_prompts(self, body: dict, prompts) -> None:
        """One choice per prompt, each with its index, as OpenAI serves a prompt list.

        mlx-lm's ``handle_completion`` builds the generation arguments, runs the
        generator, strips stop strings with its text state machine and writes the
        reply, all in one method; calling the generator directly would copy the
        first and third. So each prompt runs through it, writing to a scratch
        buffer, and ``generate_response`` keeps the reply it built.
        """
        replies, out = [], self.wfile
        try:
            for i, prompt in enumerate(prompts):
                self.wfile, self.reply = BytesIO(), None
                self.serve({**body, "prompt": prompt}, i)
                if self.reply is None:
                    out.write(self.wfile.getvalue())  # mlx-lm's error, as it sent it
                    return
                replies.append(self.reply)
        finally:
            self.wfile = out
        merged = replies[0]
        merged["choices"] = [r["choices"][0] for r in replies]
        merged["usage"] = {
            k: sum(r["usage"][k] for r in replies)
            for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        }
        self.send_json(merged)

    def validate_model_parameters(self) -> None:
        # mlx-lm answers its own refusals as {"error": "..."}; send them in OpenAI's shape.
        try:
            super().validate_model_parameters()
        except ValueError as e:
            raise Refused(f"{e}.") from None

    def generate_response(self, text, finish_reason, *args, token_logprobs=None, top_tokens=None, tokens=None, **kwargs):
        response = super().generate_response(
            text, finish_reason, *args, token_logprobs=token_logprobs, top_tokens=top_tokens, tokens=tokens, **kwargs
        )
        choice = response["choices"][0]
        choice["index"] = self.choice_index
        if self.stream and self.logprobs:
            # mlx-lm's stream events carry no logprobs: each carries those of its tokens.
            tokens = [r.token for r in self.unsent]
            token_logprobs = [r.logprob for r in self.unsent]
            top_tokens = [r.top_tokens for r in self.unsent]
            self.unsent.clear()
        if "logprobs" in choice or self.stream and self.logprobs:
            entries = self.token_logprobs(tokens, token_logprobs, top_tokens)
            if self.completion_logprobs is None:
                choice["logprobs"] = {"content": entries}
            else:
                choice["logprobs"] = completion_logprobs(entries, self.completion_logprobs, self.prompt_chars)
                self.prompt_chars += sum(len(e["token"]) for e in entries)  # a stream's next offset
        self.reply = response
        return response

    def token_logprobs(self, tokens, logprobs, top_tokens):
        """OpenAI's chat shape: each generated token, its logprob and the most likely
        tokens there. mlx-lm's gives token ids and puts a top token where the chosen one goes."""
        decode = self.settings["decode"]

        def entry(token_id, logprob):
            text = decode(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        top_tokens = top_tokens or [()] * len(tokens)
        out = []
        for i, token in enumerate(tokens):
            lp = logprobs[i] if logprobs else next((t["logprob"] for t in top_tokens[i] if t["id"] == token), None)
            top = sorted(top_tokens[i], key=lambda t: -t["logprob"])
            out.append({**entry(token, lp), "top_logprobs": [entry(t["id"], t["logprob"]) for t in top]})
        return out

    def do_GET(self):
        path = urlsplit(self.path).path
        try:
            http_checks.check_origin(self, self.settings["allowed_origins"], "server")
        except RequestError as e:
            self.send_error_json(e.status, str(e))
            return
        if path == "/v1/models":
            self.send_json({"object": "list", "data": [self.model_card()]})
        elif path.startswith("/v1/models/") and unquote(path[len("/v1/models/"):]) == self.settings["model_id"]:
            self.send_json(self.model_card())
        elif path == "/health":
            self.handle_health_check()
        else:
            self.send_error_json(404, f"No such endpoint: GET {path}.")

    def model_card(self) -> dict:
        s = self.settings
        return {"id": s["model_id"], "object": "model", "created": s["created"], "owned_by": "local"}

    def send_json(self, obj) -> None:
        body = json.dumps(obj).encode()
        self._set_completion_headers(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Recording:
    """The shared generator as one handler sees it: the Responses it yields are also
    appended to ``unsent``, for the handler's stream events to carry their logprobs."""

    def __init__(self, generator, unsent: list):
        self.generator, self.unsent = generator, unsent

    def __getattr__(self, name):
        return getattr(self.generator, name)

    def generate(self, request, args, progress_callback=None):
        ctx, responses = self.generator.generate(request, args, progress_callback)
        return ctx, self._record(responses)

    def _record(self, responses):
        for r in responses:
            self.unsent.append(r)
            yield r


def completion_logprobs(entries, n: int, offset: int) -> dict:
    """The chat shape of ``Handler.token_logprobs`` in OpenAI's completions shape;
    ``text_offset`` counts characters from the start of the prompt."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries] if n else None,
        "text_offset": offsets,
    }


class Refused(BaseException):
    """A request refused inside mlx-lm's handler, answered 400 by ``Handler.do_POST``.

    Not an Exception: mlx-lm's handler would catch it and answer in its own shape
    (a ValueError from its checks as 400, an Exception from generation as 404).
    """


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")

    httpd = http_checks.bind(args.host, args.port)  # before loading: a busy port fails fast
    provider = RePoModelProvider(mlx_lm_arguments(args))
    generator = RePoResponseGenerator(provider, LRUPromptCache(args.prompt_cache_size))
    try:
        provider.loaded.wait()
        if provider.load_error is not None:
            e = provider.load_error
            raise e if isinstance(e, LoadError) else LoadError(f"Cannot load {args.model}: {one_line(e)}")
        model, tokenizer = provider.model, provider.tokenizer
        context = context_length(model) or 4096
        limit = args.max_tokens_limit or context
        if args.max_tokens > limit:
            raise LoadError(f"--max-tokens {args.max_tokens} is above the limit of {limit} tokens.")
        generator.max_prompt_tokens = args.max_prompt_tokens or context
        if args.prompt_cache_file is not None:
            cache, generator.document = cache_prompt.load_for(args.prompt_cache_file, model)
            generator.prompt_cache.insert_cache(provider.model_key, generator.document, cache)
        settings = {
            "model_id": args.model,
            "created": int(time.time()),
            "has_chat_template": tokenizer.has_chat_template,
            "decode": lambda token: tokenizer.decode([token]),
            "allowed_origins": args.allowed_origins,
            "limits": Limits(limit, model.args.vocab_size, args.max_request_bytes),
        }
        fingerprint = get_system_fingerprint()
        httpd.RequestHandlerClass = lambda *a, **kw: Handler(
            generator, settings, *a, system_fingerprint=fingerprint, **kw
        )
        print(f"Serving {args.model} at {http_checks.url(httpd, args.host)}/v1 (Ctrl-C stops)", flush=True)
        httpd.serve_forever()
    finally:
        httpd.server_close()
        generator.stop_and_join()


def run_and_exit() -> None:
    """``_cli.run(main)``, then exit without tearing the interpreter down.

    When mlx-lm's generation thread ends, MLX destroys its per-thread compile
    cache, which needs the GIL; if the interpreter is already finalizing, the
    process aborts ("terminate called without an active exception", which
    stock mlx_lm.server also does on Ctrl-C). Everything is closed by now.
    """
    try:
        _cli.run(main)
        code = 0
    except SystemExit as e:
        code = e.code or 0
        if not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_and_exit()
