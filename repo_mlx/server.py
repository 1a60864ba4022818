"""OpenAI-compatible local server: ``python -m repo_mlx.server --model ...``.

mlx-lm's server (its ModelProvider, ResponseGenerator and APIHandler) serves the one
model repo_mlx loads. Added: each request read and parsed once and checked before it
reaches the generation thread, where an error would stop the server; errors as JSON;
stop strings matched on text (mlx-lm matches their tokens); OpenAI's completions forms
mlx-lm lacks (logprobs as a count, prompt lists, token prompts) and streamed logprobs;
--max-prompt-tokens checked before prefill, which pauses every other request;
--prompt-cache-file; 127.0.0.1 and no cross-origin access by default. Where mlx-lm 0.32
has no seam, a public method is overridden: do_POST (it reads, parses and uses the body in
one method), generate_response and completion_usage_response (logprobs, the document),
ResponseGenerator.generate (stop strings), LRUPromptCache's fetch and insert (the
document). Its ``run`` takes no handler class, so ``command`` builds the server.
"""

import argparse
import collections
import dataclasses
import functools
import io
import itertools
import json
import logging
import os
import sys
import threading
import time
import types
from urllib.parse import unquote, urlsplit

from mlx_lm.generate import TextStateMachine
from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache
from mlx_lm.server import (APIHandler, CompletionRequest, GenerationArguments, LogitsProcessorArguments,
                           ModelDescription, ModelProvider, ResponseGenerator, SamplingArguments,
                           convert_chat, get_system_fingerprint)

from . import _cli, http_checks, prompt_cache
from .errors import LoadError, one_line
from .generation import add_draft_flags, add_kv_flags, check_kv_bits, load_draft
from .http_checks import RequestError, number
from .limits import context_length

POST_PATHS = ("/v1/completions", "/v1/chat/completions", "/chat/completions")
NEXT_USER_TURN = "\nUSER:"  # where mlx-lm's plain chat transcript starts the next user turn
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_WORDS, MAX_PROMPTS, MAX_COMPLETION_LOGPROBS = 16, 32, 5  # the last: OpenAI's limit
# The request fields mlx-lm's do_POST reads into attributes of another name.
FIELDS = {"requested_model": "model", "requested_draft_model": "draft_model", "adapter": "adapters"}
# The largest max_tokens a request may ask for; logit_bias keys and token prompts are ids below vocab_size.
Limits = collections.namedtuple("Limits", "max_tokens vocab_size")


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m repo_mlx.server",
        description="Serve a RePo model over an OpenAI-compatible HTTP API "
        "(/v1/models, /v1/completions, /v1/chat/completions) built on mlx-lm's server.",
    )
    _cli.add_model_flags(p, yarn=True, required=True)
    http_checks.add_flags(p, 8080, "server", "http://localhost:3000")
    a = p.add_argument
    a("--max-tokens", type=_cli.positive_int, help="max_tokens of requests that give none (default: 512, or the model's context if it is shorter).")
    a("--max-tokens-limit", type=_cli.positive_int, help="Refuse requests asking for more tokens than this (default: the model's context length).")
    a("--max-prompt-tokens", type=_cli.positive_int, help="Refuse prompts longer than this many tokens, the --prompt-cache-file document included (default: the model's context, with --yarn's factor). A long prompt pauses every other request until it is processed.")
    a("--prompt-cache-size", type=_cli.positive_int, default=10, help="KV caches of recent prompts kept for reuse (default: 10).")
    a("--prompt-cache-bytes", type=_cli.byte_size, help="Most bytes the kept KV caches may take, e.g. 4GB (default: no limit).")
    a("--prompt-cache-file", type=_cli.existing_file, help="A document's KV cache made by repo_mlx.cache_prompt for this model and --dtype: every request's prompt continues after the document, which is not processed again.")
    a("--temp", type=_cli.non_negative_float, default=0.0, help="Temperature of requests that give none; 0 is greedy (default: 0).")
    a("--top-p", type=_cli.probability, default=1.0, help="top_p of requests that give none, 0 to 1 (default: 1, off).")
    a("--top-k", type=_cli.non_negative_int, default=0, help="top_k of requests that give none (default: 0, off).")
    a("--min-p", type=_cli.probability, default=0.0, help="min_p of requests that give none, 0 to 1 (default: 0, off).")
    add_draft_flags(p, "; requests are then served one at a time")
    a("--chat-template", default="", help="A Jinja chat template to use instead of the tokenizer's (default: the tokenizer's).")
    a("--use-default-chat-template", action="store_true", help="Use the tokenizer's default chat template when the model has none.")
    a("--chat-template-args", type=_cli.json_object, default={}, help='JSON arguments for the chat template, e.g. \'{"enable_thinking": false}\' (default: {}).')
    a("--decode-concurrency", type=_cli.positive_int, default=32, help="Requests decoded together in a batch (default: 32).")
    a("--prompt-concurrency", type=_cli.positive_int, default=8, help="Prompts processed together in a batch (default: 8).")
    add_kv_flags(p)
    a("--pipeline", action="store_true", help="mlx-lm's pipeline parallelism over mlx.launch processes; refused: the RePo server runs on one machine.")
    _cli.add_trust_remote_code(p)
    a("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="Logging level; INFO logs every request (default: INFO).")
    return p


class Provider(ModelProvider):
    """mlx-lm's model provider holding exactly one RePo model, loaded by repo_mlx."""

    def __init__(self, cli_args):
        super().__init__(cli_args)
        self.loaded, self.load_error = threading.Event(), None

    def load_default(self):
        # On mlx-lm's generation thread, so the model lives on its stream.
        a = self.cli_args
        try:
            self.model, self.tokenizer = _cli.load_from_args(a)
            if a.draft_model is not None:
                self.draft_model = load_draft(a.draft_model, self.tokenizer)
            self.is_batchable = a.draft_model is None and all(hasattr(c, "merge") for c in make_prompt_cache(self.model))
            self.model_key = (a.model, a.adapter_path, a.draft_model)
            self.created = int(time.time())  # the model card's
        except Exception as e:
            self.load_error = e
        self.loaded.set()

    def load(self, model_path=None, adapter_path=None, draft_model_path=None):
        return self.model, self.tokenizer  # whatever a request names


class DocumentCache(LRUPromptCache):
    """The prompt cache, with ``document``'s tokens (--prompt-cache-file) before every
    prompt: its entry holds the document's KV cache, which every prompt extends."""

    document = []

    def fetch_nearest_cache(self, model, tokens):
        return super().fetch_nearest_cache(model, self.document + tokens)

    def insert_cache(self, model, tokens, prompt_cache, **kw):
        super().insert_cache(model, self.document + tokens, prompt_cache, **kw)


def cut_at_stop(responses, stop_words):
    """mlx-lm Responses up to the first stop string in their text, which is dropped. Text
    that may start a stop string is held back until it is known not to. The reply then ends
    with finish_reason None, which mlx-lm's handler reports as "stop" (an end-of-text
    Response too: with "stop" it drops its text)."""
    text, sent = "", 0
    for r in responses:
        text += r.text
        # (end, start) of each stop string found: the first to complete wins.
        ends = [(i + len(w), i) for w in stop_words if (i := text.find(w, max(0, sent - len(w)))) >= 0]
        hold = 0 if ends or r.finish_reason else max(
            (k for w in stop_words for k in range(1, len(w)) if text.endswith(w[:k])), default=0)
        end = min(ends)[1] if ends else len(text) - hold
        finish = "length" if r.finish_reason == "length" and not ends else None
        yield dataclasses.replace(r, text=text[sent:end], finish_reason=finish)
        sent = end
        if ends or r.finish_reason:
            return


class Generator(ResponseGenerator):
    """mlx-lm's generation thread; replies end at stop strings found in their text,
    and the handler's thread sees the Responses it is sent (``seen``), for logprobs."""

    seen = threading.local()  # one server a process; each handler thread its own

    def generate(self, request, args, progress_callback=None):
        # Tokens stop at end of text only: mlx-lm's match of stop strings' tokens would
        # end the reply and drop the text held back for them.
        ctx, responses = super().generate(request, dataclasses.replace(args, stop_words=[]), progress_callback)
        self.seen.responses = []
        return ctx, (self.seen.responses.append(r) or r for r in cut_at_stop(responses, args.stop_words))


class DefaultsProbe(APIHandler):
    """mlx-lm's handler without a socket, run once at start on an empty body of its own (no
    client's request goes through it): its do_POST reads each field inline with its default,
    mlx-lm 0.32's only record of them, so what it sets are mlx-lm's request defaults."""

    def __init__(self, cli):
        self.path, self.headers, self.rfile = "/v1/completions", {"Content-Length": "2"}, io.BytesIO(b"{}")
        self.response_generator = types.SimpleNamespace(cli_args=cli)

    def validate_model_parameters(self):
        raise StopIteration  # every field is read by now

    def defaults(self) -> dict:
        given = set(vars(self))
        try:
            self.do_POST()
        except StopIteration:
            return {k: v for k, v in vars(self).items() if k not in given}
        raise RuntimeError("mlx-lm's do_POST no longer validates the request")


def check_request(body, path: str, limits: Limits, model_id: str, has_chat_template: bool) -> dict:
    """The request to serve, or a RequestError saying what is wrong. Null fields mean the
    default, as in OpenAI's API. These are the checks mlx-lm's validate_model_parameters
    lacks (booleans as numbers, infinities, upper limits, logit_bias keys, stop strings,
    messages, unsupported fields) and OpenAI's completions forms: logprobs as a count and
    ``prompt`` as a list (``prompts``, one choice each) of strings or of token ids."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    body = {k: v for k, v in body.items() if v is not None}
    for key, kind, name in (("model", str, "a string"), ("stream_options", dict, "an object"),
                            ("chat_template_kwargs", dict, "an object"), ("tools", list, "a list")):
        if key in body and not isinstance(body[key], kind):
            raise RequestError(f"{key} must be {name}.")
    for key in ("adapters", "draft_model"):
        if key in body:
            raise RequestError(f"{key} is not supported: the server runs the model and adapters it was started with.")
    for key, only in (("n", 1), ("best_of", 1), ("echo", False)):
        if key in body and body[key] != only:
            raise RequestError(f"{key} is not supported (only {json.dumps(only)}).")
    options = body["stream_options"] = {"include_usage": False, **body.get("stream_options", {})}
    if not isinstance(options["include_usage"], bool):
        raise RequestError("include_usage must be true or false.")
    for key in ("max_tokens", "max_completion_tokens"):
        number(body, key, 1, limits.max_tokens, integer=True)
    number(body, "top_k", 0, limits.vocab_size, integer=True)
    number(body, "seed", 0, 2**64 - 1, integer=True)  # what mx.random.seed accepts
    number(body, "temperature", 0)
    for key, low, high in (("top_p", 0, 1), ("min_p", 0, 1), ("presence_penalty", -100, 100),
                           ("frequency_penalty", -100, 100), ("xtc_probability", 0, 1), ("xtc_threshold", 0, 1)):
        if number(body, key, low, high) is not None and key.startswith("xtc"):
            body[key] = float(body[key])  # mlx-lm takes floats only
    bias = body.get("logit_bias", {})
    if not (isinstance(bias, dict) and all(k.isdecimal() and int(k) < limits.vocab_size for k in bias)):
        raise RequestError(f"logit_bias must map token ids (0 to {limits.vocab_size - 1}) to numbers from -100 to 100.")
    for k in bias:
        number(bias, k, -100, 100)
    stop = body.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOP_WORDS and all(isinstance(w, str) and w for w in stop)):
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP_WORDS} of them.")

    if path == "/v1/completions":
        prompt = body.get("prompt")
        # OpenAI's forms: a string, a list of token ids, or a list of either.
        prompts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        ids = lambda p: isinstance(p, list) and all(type(t) is int and 0 <= t < limits.vocab_size for t in p)
        if not (0 < len(prompts) <= MAX_PROMPTS and all((isinstance(p, str) or ids(p)) and p for p in prompts)):
            raise RequestError(f"prompt must be a non-empty string or list of token ids (0 to {limits.vocab_size - 1}), "
                               f"or a list of at most {MAX_PROMPTS} of them.")
        if prompts != [prompt]:
            if body.get("stream"):
                raise RequestError("A list of prompts is served whole, not streamed: drop stream, or send one request per prompt.")
            body["prompts"] = prompts
        if "logprobs" in body:  # OpenAI's completions form: how many top tokens to list
            n = body["logprobs"]
            if not (type(n) is int and 0 <= n <= MAX_COMPLETION_LOGPROBS):
                raise RequestError(f"logprobs must be an integer from 0 to {MAX_COMPLETION_LOGPROBS} on /v1/completions "
                                   f"(the number of most likely tokens to list), got {n!r}.")
            if "top_logprobs" in body:
                raise RequestError("top_logprobs belongs to chat; on /v1/completions logprobs gives the count.")
            body["logprobs"], body["top_logprobs"] = True, n
    else:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list.")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise RequestError(f"messages[{i}] must be an object with a role: {', '.join(ROLES)}.")
            text = m.get("content")
            if text is None and m["role"] == "assistant" and m.get("tool_calls"):
                text = ""  # OpenAI's form of a turn that only calls tools
            if isinstance(text, list) and all(isinstance(t, dict) and t.get("type") == "text" and isinstance(t.get("text"), str) for t in text):
                text = "".join(t["text"] for t in text)
            if not isinstance(text, str):
                raise RequestError(f'messages[{i}].content must be a string or a list of text parts ({{"type": "text", "text": ...}}); this model reads text only.')
            messages[i] = {**m, "content": text}
        mapping = body.get("role_mapping")
        if mapping is not None and not (isinstance(mapping, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())):
            raise RequestError("role_mapping must map strings to strings.")
        if not has_chat_template and not mapping and NEXT_USER_TURN not in stop:
            stop = stop + [NEXT_USER_TURN]  # a base model ends its turn where it starts the next
    body["stop"], body["model"] = stop, model_id  # replies name the model that served them
    return body


class Handler(http_checks.JSONErrors, APIHandler):
    """mlx-lm's request handler behind a check of every request; its settings are mlx-lm's:
    the command line (with the limits ``command`` fills in) and the model provider."""

    timeout = 60  # seconds a client may stall while sending; frees its thread

    def log_message(self, format, *args):
        logging.info("%s %s", self.address_string(), format % args)

    def send_json(self, obj, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self._set_completion_headers(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        cli, provider = self.response_generator.cli_args, self.response_generator.model_provider
        try:
            self.path, body = http_checks.read_json(self, POST_PATHS, cli.max_request_bytes, cli.allowed_origins, "server")
            limits = Limits(cli.max_tokens_limit, provider.model.args.vocab_size)
            body = check_request(body, self.path, limits, cli.model, provider.tokenizer.has_chat_template)
            self.read_request(body)
            try:
                self.validate_model_parameters()  # mlx-lm's own checks
            except ValueError as e:
                raise RequestError(f"{e}.") from None
            if self.path == "/v1/completions":
                prompts = [self.text(p) for p in body.get("prompts", [body["prompt"]])]
                body["prompt"], self.offset = prompts[0], len(prompts[0])
                request = self.handle_text_completions()  # also the reply's id and kind
                if "prompts" in body:  # mlx-lm's handler serves one prompt a request
                    return self.serve_prompts(prompts, body["stop"])
            else:
                request = self.handle_chat_completions()
                self.check_length(request)
            self.handle_completion(request, body["stop"])
        except RequestError as e:
            self.send_error_json(e.status, str(e))

    def read_request(self, body: dict) -> None:
        """The attributes mlx-lm's do_POST sets, from the checked body or mlx-lm's defaults."""
        for attr, default in self.response_generator.request_defaults.items():
            setattr(self, attr, body.get(FIELDS.get(attr, attr), default))
        self.body, self.max_tokens = body, body.get("max_completion_tokens", self.max_tokens)
        self.choice_index, self.offset = 0, 0

    def text(self, prompt) -> str:
        """A completions prompt as the text mlx-lm tokenizes, its length checked; token
        ids that do not come back the same through the tokenizer are refused."""
        tokenizer = self.response_generator.model_provider.tokenizer
        text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
        if isinstance(prompt, list) and tokenizer.encode(text) not in (prompt, tokenizer.encode("") + prompt):
            raise RequestError("This prompt of token ids does not come back the same through the model's tokenizer, "
                               "which the server runs prompts through: send its text instead.")
        self.check_length(text)
        return text

    def check_length(self, prompt) -> None:
        """Refuse a prompt over --max-prompt-tokens, counted as mlx-lm's generation thread will."""
        cli, tokenizer = self.response_generator.cli_args, self.response_generator.model_provider.tokenizer
        document, limit = self.response_generator.prompt_cache.document, cli.max_prompt_tokens
        if isinstance(prompt, str):
            n = len(tokenizer.encode(prompt))
        elif tokenizer.has_chat_template:
            kwargs = {**cli.chat_template_args, **(self.chat_template_kwargs or {})}
            n = len(tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tools=prompt.tools, **kwargs))
        else:
            n = len(tokenizer.encode(convert_chat(prompt.messages, prompt.role_mapping)))
        if n + len(document) > limit:
            doc = f" ({len(document)} of them the cached document)" if document else ""
            raise RequestError(f"The prompt is {n + len(document)} tokens{doc}, more than this server's limit of {limit} (--max-prompt-tokens): shorten it.")

    def serve_prompts(self, prompts, stop) -> None:
        """One choice per prompt, as OpenAI serves a prompt list (mlx-lm serves one
        prompt a request, and its handle_completion writes the reply itself)."""
        args = GenerationArguments(
            ModelDescription(self.requested_model, self.requested_draft_model, self.adapter),
            SamplingArguments(self.temperature, self.top_p, self.top_k, self.min_p, self.xtc_probability, self.xtc_threshold),
            LogitsProcessorArguments(self.logit_bias, self.repetition_penalty, self.repetition_context_size, self.presence_penalty,
                                     self.presence_context_size, self.frequency_penalty, self.frequency_context_size),
            stop, self.max_tokens, self.num_draft_tokens, self.logprobs, self.top_logprobs, self.seed, None,
        )  # fmt: skip
        replies = []
        for self.choice_index, prompt in enumerate(prompts):
            self.offset = len(prompt)
            ctx, responses = self.response_generator.generate(CompletionRequest("text", prompt, [], None, None), args)
            state, text, finish, n = ctx.text_sm.make_state(ctx.initial_state), "", "stop", 0
            try:
                for n, r in enumerate(responses, 1):
                    state, parts = TextStateMachine.split(state, r.text)
                    if r.finish_reason == "length":
                        state, rest, now = TextStateMachine.flush(state)
                        parts.append((now, rest))
                    text += "".join(t for where, t in parts if where == "normal")  # cut_at_stop sends no "stop"
                    finish = r.finish_reason or finish
            finally:
                ctx.stop()
            replies.append(self.generate_response(text, finish, len(ctx.prompt), n, ctx.prompt_cache_count))
        merged = dict(replies[0], choices=[r["choices"][0] for r in replies])
        merged["usage"] = {k: sum(r["usage"][k] for r in replies) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        self.send_json(merged)

    def generate_response(self, *args, **kwargs):
        response = self.add_document(super().generate_response(*args, **kwargs))
        response["choices"][0]["index"] = self.choice_index
        # The Responses since the last reply: all of them, or a stream event's.
        seen, self.response_generator.seen.responses = self.response_generator.seen.responses, []
        if self.logprobs:
            response["choices"][0]["logprobs"] = self.openai_logprobs(seen)
        return response

    def openai_logprobs(self, seen) -> dict:
        """OpenAI's logprobs of the Responses ``seen``: each token, its logprob and the most
        likely tokens there, in chat's shape or in the completions shape."""
        decode = self.response_generator.model_provider.tokenizer.decode
        texts = [decode([r.token]) for r in seen]
        by_logprob = lambda top: sorted(top, key=lambda x: -x["logprob"])
        tops = [[(decode([x["id"]]), x["logprob"]) for x in by_logprob(r.top_tokens)] for r in seen]
        if self.object_type == "text_completion":
            offsets = list(itertools.accumulate(map(len, texts), initial=self.offset))  # from the prompt's start
            self.offset = offsets.pop()
            return {
                "tokens": texts, "token_logprobs": [r.logprob for r in seen],
                "top_logprobs": [dict(top) for top in tops] if self.top_logprobs > 0 else None, "text_offset": offsets,
            }  # fmt: skip
        entry = lambda text, logprob: {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        entries = [{**entry(t, r.logprob), "top_logprobs": [entry(*x) for x in top]} for t, r, top in zip(texts, seen, tops)]
        return {"content": entries}

    def completion_usage_response(self, *args, **kwargs):
        return self.add_document(super().completion_usage_response(*args, **kwargs))

    def add_document(self, response: dict) -> dict:
        """Usage counts the cached document (mlx-lm sees the prompt after it)."""
        if (usage := response.get("usage")) and (n := len(self.response_generator.prompt_cache.document)):
            usage["prompt_tokens"] += n
            usage["total_tokens"] += n
            if "prompt_tokens_details" in usage:
                usage["prompt_tokens_details"]["cached_tokens"] += n
        return response

    def do_GET(self):
        path, cli = unquote(urlsplit(self.path).path), self.response_generator.cli_args
        created = self.response_generator.model_provider.created
        card = {"id": cli.model, "object": "model", "created": created, "owned_by": "local"}
        replies = {"/v1/models": {"object": "list", "data": [card]}, f"/v1/models/{cli.model}": card}
        try:
            http_checks.check_origin(self, cli.allowed_origins, "server")
            if path == "/health":
                return self.handle_health_check()
            if path not in replies:
                raise RequestError(f"No such endpoint: GET {path}.", 404)
            self.send_json(replies[path])
        except RequestError as e:
            self.send_error_json(e.status, str(e))


def command(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    if args.pipeline:
        raise LoadError("--pipeline is not supported: the RePo server runs the model on one machine.")
    httpd = http_checks.bind(args.host, args.port)  # before loading: a busy port fails fast
    provider = Provider(args)  # mlx-lm's settings, under its flags' names
    generator = Generator(provider, DocumentCache(args.prompt_cache_size))
    try:
        provider.loaded.wait()
        if (e := provider.load_error) is not None:
            raise e if isinstance(e, LoadError) else LoadError(f"Cannot load {args.model}: {one_line(e)}")
        model, context = provider.model, context_length(provider.model) or 4096
        # The defaults that depend on the model, where the handlers read the flags.
        args.max_tokens_limit = args.max_tokens_limit or context
        args.max_prompt_tokens = args.max_prompt_tokens or context
        args.max_tokens = args.max_tokens or min(512, args.max_tokens_limit)
        args.kv_group_size = check_kv_bits(model, args.kv_bits, args.kv_group_size)
        if args.max_tokens > args.max_tokens_limit:
            raise LoadError(f"--max-tokens {args.max_tokens} is above the limit of {args.max_tokens_limit} tokens.")
        if args.prompt_cache_file is not None:
            cache, generator.prompt_cache.document = prompt_cache.load_for(args.prompt_cache_file, model, provider.tokenizer)
            if not all(type(c).__name__ == "KVCache" for c in cache):
                raise LoadError(f"{args.prompt_cache_file} holds a quantized or rotating cache; the server takes "
                                "one made without --kv-bits and --max-kv-size.")
            generator.prompt_cache.insert_cache(provider.model_key, [], cache)  # the document alone
        generator.request_defaults = DefaultsProbe(args).defaults()
        httpd.RequestHandlerClass = functools.partial(Handler, generator, system_fingerprint=get_system_fingerprint())
        print(f"Serving {args.model} at {http_checks.url(httpd, args.host)}/v1 (Ctrl-C stops)", flush=True)
        httpd.serve_forever()
    finally:
        httpd.server_close()
        generator.stop_and_join()


def main(argv=None) -> None:
    """The command line, then an exit without tearing the interpreter down: when
    mlx-lm's generation thread ends, MLX frees its per-thread compile cache, which
    needs the GIL; a finalizing interpreter then aborts (stock mlx_lm.server too)."""
    try:
        _cli.run(command, argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
