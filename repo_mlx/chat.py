"""Chat in the terminal with a RePo model: ``python -m repo_mlx.chat --model M``.

A base model (no chat template) reads the plain transcript the server uses, mlx-lm's
``USER: ...`` / ``ASSISTANT:``, and its reply ends where it starts the next ``USER:`` turn.
Each turn the whole transcript is tokenized and only what the KV cache lacks is fed, so every
reply is what ``repo_mlx.generate`` gives on the whole transcript.
"""

import argparse
import functools
import itertools
import sys
from typing import List, Optional

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.server import convert_chat
from mlx_lm.utils import common_prefix_len

from . import _cli
from .errors import LoadError
from .generation import add_kv_flags, add_sampling_flags, sampler
from .limits import check_length, check_tokens_fit

NEXT_USER_TURN = "\nUSER:"  # as in repo_mlx.server
HELP = "Type a message; r (or /reset) starts a new conversation, h (or /help) shows this, q (or /exit, Ctrl-D) quits."
EXIT, RESET, SHOW_HELP = ("q", "/exit", "/quit"), ("r", "/reset"), ("h", "/help", "/?")  # mlx_lm.chat's one letters too


class Chat:
    """A conversation whose KV cache outlives each turn."""

    def __init__(self, model, tokenizer, system_prompt: Optional[str] = None, max_kv_size=None):
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt, self.max_kv_size = system_prompt, max_kv_size
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.cache = make_prompt_cache(self.model, self.max_kv_size)
        self.cached: List[int] = []  # the tokens whose keys and values the cache holds
        self.last_tokens: List[int] = []

    def transcript(self) -> List[int]:
        tok = self.tokenizer
        if tok.has_chat_template:
            return tok.apply_chat_template(self.messages, add_generation_prompt=True)
        return tok.encode(convert_chat(self.messages))

    def turn(self, text: str, max_tokens: int, sampler, on_text=None, prefill_step_size: int = 2048) -> str:
        """The reply to ``text``; ``on_text`` gets it piece by piece as it is generated, without
        the blanks it starts with (the space after "ASSISTANT:")."""
        self.messages.append({"role": "user", "content": text})
        tokens = self.transcript()
        check_length(self.model, len(tokens), what="The conversation")
        # Keep the cached prefix the transcript shares; its last token is fed again to get the first logits.
        keep = min(common_prefix_len(self.cached, tokens), len(tokens) - 1)
        drop = len(self.cached) - keep
        if drop and can_trim_prompt_cache(self.cache):
            trim_prompt_cache(self.cache, drop)
        elif drop:  # a rotating cache cannot go back: start it again
            self.cache, keep = make_prompt_cache(self.model, self.max_kv_size), 0
        self.cached = tokens[:keep]
        generated, reply, shown = [], "", 0
        try:
            for r in stream_generate(
                self.model, self.tokenizer, mx.array(tokens[keep:]), max_tokens=max_tokens,
                sampler=sampler, prompt_cache=self.cache, prefill_step_size=prefill_step_size,
            ):
                generated.append(r.token)
                self.prompt_tokens = r.prompt_tokens  # fed this turn
                reply += r.text
                end = reply.find(NEXT_USER_TURN) if not self.tokenizer.has_chat_template else -1
                if end >= 0:
                    reply = reply[:end]
                shown = max(shown, len(reply) - len(reply.lstrip()))
                # Hold back what may be the start of the next turn's marker.
                hold = next((k for k in range(len(NEXT_USER_TURN) - 1, 0, -1) if reply.endswith(NEXT_USER_TURN[:k])), 0)
                if on_text is not None and len(reply) - hold > shown:
                    on_text(reply[shown : len(reply) - hold])
                    shown = len(reply) - hold
                if end >= 0:
                    break
        except KeyboardInterrupt:  # the reply is dropped; the cache no longer matches
            self.messages.pop()
            self.cache, self.cached = make_prompt_cache(self.model, self.max_kv_size), []
            raise
        if on_text is not None and len(reply) > shown:
            on_text(reply[shown:])
        # The cache holds every token fed: the prompt and the generated ones.
        fed = tokens + generated
        offset = self.cache[0].offset
        if offset > len(fed) and can_trim_prompt_cache(self.cache):
            trim_prompt_cache(self.cache, offset - len(fed))
        self.cached = fed[:offset]
        self.last_tokens = generated
        self.messages.append({"role": "assistant", "content": reply.strip()})
        return reply


def build_parser():
    p = _cli.ArgumentParser(
        prog="python -m repo_mlx.chat",
        description="Chat with a RePo model (OLMo-2, Llama or Qwen3) in the terminal, keeping the "
        "conversation's KV cache between turns. " + HELP,
    )
    _cli.add_model_flags(p)
    p.add_argument("--max-tokens", "-m", type=_cli.token_count, default=256, help="Most tokens per reply (default: 256).")
    add_sampling_flags(p, seed=0)
    add_kv_flags(p, bits=False, max_kv=True)
    p.add_argument("--pipeline", action="store_true", help="mlx-lm's pipeline parallelism over mlx.launch processes; refused: chat runs the model on one machine.")
    p.add_argument(
        "--system-prompt", type=_cli.text, default=None,
        help="A system message first in the conversation (a base model reads it as \"ASSISTANT's RULE: ...\").",
    )  # fmt: skip
    _cli.add_trust_remote_code(p)
    return p


def command(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.pipeline:
        raise LoadError("--pipeline is not supported: chat runs the RePo model on one machine.")
    model, tokenizer = _cli.load_from_args(args)
    check_tokens_fit(model, args.max_kv_size or args.max_tokens, "--max-tokens")
    if args.seed is not None:  # after loading: building the model draws random numbers
        mx.random.seed(args.seed)
    chat = Chat(model, tokenizer, args.system_prompt, args.max_kv_size)
    tty = sys.stdin.isatty()
    if tty:
        print(f"[INFO] {args.model}. {HELP}", file=sys.stderr)

    show = functools.partial(print, end="", flush=True)
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is refused below
        sys.stdin.reconfigure(errors="surrogateescape")
    for number in itertools.count(1):
        try:
            line = input(">> " if tty else "")
        except EOFError:
            break
        try:
            line = _cli.text(line).strip()
        except argparse.ArgumentTypeError as e:
            if not tty:
                raise LoadError(f"stdin line {number} {e}.") from None
            print(f"error: that message {e}; type it again.", file=sys.stderr)
            continue
        if not line:
            continue
        if line in EXIT:
            break
        if line in RESET:
            chat.reset()
            if tty:
                print("[INFO] New conversation.", file=sys.stderr)
            continue
        if line in SHOW_HELP:
            print(HELP, file=sys.stderr)
            continue
        try:
            chat.turn(line, args.max_tokens, sampler(args, tokenizer), show, args.prefill_step_size)
        except KeyboardInterrupt:
            print("\n[interrupted: reply dropped]", end="", file=sys.stderr)
        print(flush=True)


def main(argv=None) -> None:
    _cli.run(command, argv)


if __name__ == "__main__":
    main()
