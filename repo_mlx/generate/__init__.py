"""Generate text with a RePo model: ``python -m repo_mlx.generate --prompt ...``.

Every flag of ``mlx_lm.generate`` with its meaning (a model with a chat template
gets the prompt as a user message, as there), plus RePo's: --yarn,
--position-blend and --prompt-file.
"""

import argparse

import mlx.core as mx
from mlx_lm.generate import generate as mlx_lm_generate

from .. import _cli, prompt_cache
from ..errors import LoadError
from ..generation import add_draft_flags, add_kv_flags, add_sampling_flags, check_kv_bits, load_draft, sampler
from ..limits import check_length, check_tokens_fit

DEFAULT_PROMPT = "The key idea of positional encoding in transformers is"


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m repo_mlx.generate",
        description="Generate text with a RePo model (OLMo-2, Llama or Qwen3), streaming it to stdout.",
    )
    _cli.add_model_flags(p, yarn=True)
    _cli.add_prompt_flags(p, default=DEFAULT_PROMPT)
    a = p.add_argument
    a("--system-prompt", type=_cli.text, help="A system message before the prompt, for a model with a chat template.")
    a("--prefill-response", type=_cli.text, help="The start of the reply, which the model continues (chat template models).")
    a("--ignore-chat-template", action="store_true", help="Give the prompt as it is, even to a model with a chat template.")
    a("--use-default-chat-template", action="store_true", help="Use the tokenizer's default chat template when the model has none.")
    a("--chat-template-config", type=_cli.json_object, help='JSON arguments for the chat template, e.g. \'{"enable_thinking": false}\'.')
    a("--extra-eos-token", nargs="+", default=(), type=_cli.text, help="More tokens that end the reply, e.g. '<|im_end|>'.")
    a("--image", nargs="+", default=(), help="Images for vision models; refused: RePo models read text only.")
    a("--max-tokens", "-m", type=_cli.token_count, default=100, help="Tokens to generate (default: 100).")
    add_sampling_flags(p)
    add_kv_flags(p, max_kv=True)
    add_draft_flags(p)
    a("--quantize-activations", "-qa", action="store_true", help="Quantize activations as the weights are (nvfp4 and mxfp8 models, see convert --q-mode).")
    a("--position-blend", type=_cli.probability, default=0.0, help="Blend learned positions with token indices: 0 = RePo as trained, 1 = plain RoPE in every layer (the paper's ablation) (default: 0).")
    a("--prompt-cache-file", type=_cli.existing_file, help="A document's KV cache made by repo_mlx.cache_prompt: the prompt continues after the document, as plain text. Needs the model, --dtype, --yarn, --position-blend and --adapter-path that made it.")
    _cli.add_trust_remote_code(p)
    a("--verbose", type=_cli.boolean, default=True, help="True prints separators and speed; False the text only (default: True).")
    return p


def format_prompt(tokenizer, args, prompt: str, continuation: bool) -> list:
    """The prompt's tokens; a model with a chat template gets it as a user message (after
    --system-prompt, before --prefill-response), as in mlx_lm.generate. After a cached document
    (plain text) the prompt continues it as plain text, with no BOS in the middle."""
    if args.ignore_chat_template or not tokenizer.has_chat_template or continuation:
        return tokenizer.encode(prompt, add_special_tokens=not continuation)
    messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt is not None else []
    prefill = args.prefill_response is not None
    messages += [{"role": "user", "content": prompt}] + ([{"role": "assistant", "content": args.prefill_response}] if prefill else [])
    kw = dict(tokenize=False, continue_final_message=prefill, add_generation_prompt=not prefill, **(args.chat_template_config or {}))
    return tokenizer.encode(tokenizer.apply_chat_template(messages, **kw), add_special_tokens=False)


def command(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.image:
        raise LoadError("--image is for vision models: RePo models read text only.")
    if args.prompt_cache_file is not None and args.max_kv_size is not None:
        raise LoadError("--max-kv-size cannot be used with --prompt-cache-file: the cached document is in a plain KV cache.")
    prompt = _cli.read_prompt(args, DEFAULT_PROMPT)
    if args.prompt not in (None, "-"):  # mlx-lm's escapes in --prompt
        prompt = prompt.replace("\\n", "\n").replace("\\t", "\t")
    if not prompt:
        raise LoadError("The prompt is empty; give text with --prompt, --prompt-file or on stdin (--prompt -).")
    model, tokenizer = _cli.load_from_args(args, position_blend=args.position_blend, quantize_activations=args.quantize_activations)
    for token in args.extra_eos_token:
        tokenizer.add_eos_token(token)
    args.kv_group_size = check_kv_bits(model, args.kv_bits, args.kv_group_size)
    draft = load_draft(args.draft_model, tokenizer) if args.draft_model else None
    cache = prompt_cache.load_for(args.prompt_cache_file, model, tokenizer)[0] if args.prompt_cache_file else None
    prompt = format_prompt(tokenizer, args, prompt, cache is not None)
    if not prompt:
        raise LoadError("The prompt encodes to no tokens; give some text.")
    cached = cache[0].offset if cache else 0
    check_length(model, cached + len(prompt), args.max_tokens, cached=cached)
    check_tokens_fit(model, cached + len(prompt) + args.max_tokens, "--max-tokens")
    if args.seed is not None:  # after loading: building the model draws random numbers
        mx.random.seed(args.seed)
    text = mlx_lm_generate(  # not repo_mlx.generate: the length is checked above, the document included
        model, tokenizer, prompt, verbose=args.verbose, max_tokens=args.max_tokens,
        sampler=sampler(args, tokenizer), max_kv_size=args.max_kv_size, prefill_step_size=args.prefill_step_size,
        prompt_cache=cache, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
        quantized_kv_start=args.quantized_kv_start, draft_model=draft, num_draft_tokens=args.num_draft_tokens,
    )  # fmt: skip
    if not args.verbose:
        print(text)


def main(argv=None) -> None:
    _cli.run(command, argv)
