"""Measure what RePo buys: ``python -m repo_mlx.evaluate --task ...``.

Perplexity on a text file and RULER-style synthetic tasks (see ``tasks.py``),
run for one or more position blends side by side: 0 is the model with its
learned positions, 1 the same weights with plain RoPE (the official code's
``dynamic_pe_pdrop`` ablation). ``--yarn`` applies YaRN to every layer, as the paper did for 8K/16K.
"""

import argparse
import json
import math
import re
import os
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from tqdm import tqdm

from . import _cli, tasks
from .errors import LoadError
from .limits import check_length, check_tokens_fit, context_length
from .rope import set_position_blend
from .files import atomic_file

ALL_TASKS = ("perplexity",) + tasks.TASKS


def windows(n: int, window: int, stride: int) -> List[Tuple[int, int, int]]:
    """(start, end, first) per window: tokens first..end-1 are scored with context from start.
    Every token after the first is scored once, with at least ``window - stride`` tokens of context."""
    out, done = [], 1
    for start in range(0, max(n - 1, 0), stride):
        end = min(start + window, n)
        out.append((start, end, max(done, start + 1)))
        done = end
        if end == n:
            break
    return out


def window_nll(model, ids: List[int], first: int, chunk: int = 512, progress=None) -> float:
    """Sum of -log p(ids[t] | ids[:t]) over t >= first (indices within ``ids``)."""
    cache = make_prompt_cache(model)
    inputs, targets = ids[:-1], ids[1:]
    total = 0.0
    # Chunks through a KV cache keep the [tokens, vocab] logits small on long windows.
    for a in range(0, len(inputs), chunk):
        logits = model(mx.array(inputs[a : a + chunk])[None], cache=cache)[0]
        skip = max(first - 1 - a, 0)  # logits row r predicts ids[r + 1]
        if skip < logits.shape[0]:
            lp = logits[skip:].astype(mx.float32)
            t = mx.array(targets[a + skip : a + chunk])
            nll = mx.logsumexp(lp, axis=-1) - mx.take_along_axis(lp, t[:, None], axis=-1)[:, 0]
            total += nll.sum().item()
        else:
            mx.eval([c.state for c in cache])
        if progress is not None:
            progress.update(logits.shape[0])
    return total


def perplexity(model, tokens: List[int], window: int, stride: Optional[int] = None, progress=None) -> Dict:
    spans = windows(len(tokens), window, stride or window)
    count = sum(end - first for _, end, first in spans)
    nll = sum(window_nll(model, tokens[start:end], first - start, progress=progress) for start, end, first in spans)
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(spans)}


def answer(model, tokenizer, prompt: str, max_tokens: int, progress=None) -> str:
    """Greedy continuation of ``prompt``, stopped after its first non-blank line."""
    out = []
    start = progress.n if progress is not None else 0
    # Long prompts take a while: move the bar as they go.
    prefilled = None if progress is None else lambda n, total: progress.update(start + n - progress.n)
    ids = mx.array(tokenizer.encode(prompt))
    for token, _ in generate_step(ids, model, max_tokens=max_tokens, prompt_progress_callback=prefilled):
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
        if "\n" in tokenizer.decode(out).lstrip():
            break
    return tokenizer.decode(out)


def run_samples(model, tokenizer, samples: List[tasks.Sample], progress=None) -> Dict:
    rows = []
    for s in samples:
        prediction = tasks.first_line(answer(model, tokenizer, s.prompt, s.max_tokens, progress))
        rows.append({"answers": s.answers, "prediction": prediction, "score": tasks.score(prediction, s.answers),
                     "depth": round(s.depth, 4), "prompt_tokens": s.prompt_tokens})
    return {"score": sum(r["score"] for r in rows) / len(rows), "samples": rows}


def parse_length(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", text)
    if not m or not 1 <= int(m.group(1)) * (1024 if m.group(2) else 1) <= _cli.MAX_TOKENS:
        raise LoadError(f"Bad context length {text!r}; use numbers such as 1024 or 4K.")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def parse_tasks(text: str) -> List[str]:
    chosen = []
    for t in text.split(","):
        t = t.strip()
        names = tasks.TASKS if t == "ruler" else (t,)
        if names[0] not in ALL_TASKS:
            raise LoadError(f"Unknown task {t!r}; tasks: {', '.join(ALL_TASKS)}, ruler (all synthetic ones).")
        chosen += [n for n in names if n not in chosen]
    return chosen


def table(results: List[Dict], blends: List[float]) -> str:
    """One row per task and length, one column per position blend."""
    keys = list(dict.fromkeys((r["task"], r["length"]) for r in results))
    cols = [_cli.blend_name(b) for b in blends]
    width = max(16, *(len(c) + 2 for c in cols))
    lines = [f"{'task':<20}{'length':>8}" + "".join(f"{c:>{width}}" for c in cols)]
    for task, length in keys:
        row = [r for b in blends for r in results if (r["task"], r["length"], r["position_blend"]) == (task, length, b)]
        cells = [f"{r['perplexity']:.3f}" if task == "perplexity" else f"{100 * r['score']:.1f}%" for r in row]
        lines.append(f"{task:<20}{length:>8}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        elsewhere={f: "mlx_lm.evaluate's lm-eval benchmarks are python -m repo_mlx.lm_eval here; this command is RePo's long-context tasks and perplexity"
                   for f in ("--tasks", "--output-dir", "--num-shots", "--limit", "--batch-size", "--fewshot-as-multiturn", "--apply-chat-template")},
        prog="python -m repo_mlx.evaluate",
        description="Evaluate a RePo model: perplexity on a text file and synthetic "
        "long/noisy-context tasks (needle in a haystack, key-value retrieval, variable "
        "tracking), optionally with learned positions and plain RoPE side by side.",
    )
    _cli.add_model_flags(p, yarn=True, adapter=False)
    p.add_argument("--task", required=True, help="Comma-separated tasks: perplexity, "
                   + ", ".join(tasks.TASKS) + "; 'ruler' means all synthetic ones.")
    p.add_argument("--data", type=_cli.existing_file, help="Plain-text file for perplexity, tokenized as is (OLMo-2 adds no BOS).")
    p.add_argument("--window", type=_cli.int_range(2), default=None, help="Perplexity window in tokens (default: the model's context, 4096 for the release; YaRN multiplies it).")
    p.add_argument("--stride", type=_cli.positive_int, default=None, help="Perplexity window step; smaller than --window gives every token more context (default: --window).")
    p.add_argument("--lengths", help="Context lengths in tokens for the synthetic tasks, e.g. 1K,2K,4K,8K,16K (default: 1K,2K,4K, those within the model's context; a context under 1K: the context, 256 for the demo).")
    p.add_argument("--samples", type=_cli.positive_int, default=10, help="Samples per synthetic task and length (default: 10).")
    p.add_argument("--seed", type=_cli.seed, default=0, help="Seed the synthetic samples are made from (default: 0).")
    _cli.add_blends_flag(p)
    _cli.add_trust_remote_code(p)
    p.add_argument("--output", type=_cli.output_file, default=None, help="Also write the results, with every sample's prediction, as JSON here.")
    return p


def command(argv=None) -> None:
    args = build_parser().parse_args(argv)
    names = parse_tasks(args.task)
    blends = _cli.parse_blends(args.position_blend)
    lengths = list(dict.fromkeys(parse_length(t) for t in args.lengths.split(","))) if args.lengths else None
    if "perplexity" in names:
        if args.data is None:
            raise LoadError("--task perplexity needs --data FILE (plain text).")
        text = _cli.read_text(args.data, f"--data {args.data}")

    model, tokenizer = _cli.load_from_args(args)
    context = context_length(model) or 4096
    lengths = lengths or [n for n in (1024, 2048, 4096) if n <= context] or [context]
    check_tokens_fit(model, max(lengths), "--lengths")
    synthetic = [n for n in names if n != "perplexity"]
    for length in lengths if synthetic else []:
        check_length(model, length, what="A context")
    held = 40 * args.samples * sum(lengths) * len(synthetic)  # bytes: Python ints in token lists
    if held > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
        raise LoadError(f"--samples {args.samples}: the samples' {held // 40} tokens take {held / 2**30:.3g} GiB, "
                        "more than this machine's memory; ask for fewer.")
    window = args.window or context
    stride = args.stride or window
    if stride > window:
        raise LoadError(f"--stride {stride} is longer than the window of {window}: tokens would be skipped.")

    work = 0
    if "perplexity" in names:
        tokens = tokenizer.encode(text)
        if len(tokens) < 2:
            raise LoadError(f"--data {args.data} has fewer than 2 tokens.")
        check_length(model, min(window, len(tokens)), what="The perplexity window")
        work += sum(end - start - 1 for start, end, _ in windows(len(tokens), window, stride))
    samples = {}
    for name in synthetic:
        for length in lengths:
            try:
                samples[name, length] = tasks.make_samples(name, tokenizer, length, args.samples, args.seed)
            except ValueError as e:
                if args.lengths or "ruler" not in args.task:  # asked for by name: an error
                    raise LoadError(f"{name}: {e}.") from None
                print(f"{name} left out: {e}, more than the model's context; --lengths runs it past the context.")
                names = [n for n in names if n != name]
                break
            work += sum(s.prompt_tokens for s in samples[name, length])

    results = []
    # disable=None: a bar on a terminal, silence when output goes to a file.
    with tqdm(total=work * len(blends), disable=None, unit="tok", unit_scale=True) as bar:
        for blend in blends:
            set_position_blend(model, blend)
            for name in names:
                for length in [window] if name == "perplexity" else lengths:
                    bar.set_description(f"{_cli.blend_name(blend)} {name} {length}")
                    if name == "perplexity":
                        r = perplexity(model, tokens, window, stride, bar)
                    else:
                        r = run_samples(model, tokenizer, samples[name, length], bar)
                    results.append({"task": name, "length": length, "position_blend": blend, **r})

    header = f"model {args.model}, YaRN {'x%g' % args.yarn if args.yarn else 'off'}"
    if samples:
        header += f", {args.samples} sample{'s' if args.samples > 1 else ''} per task and length, seed {args.seed}"
    if "perplexity" in names:
        scored = next(r["tokens"] for r in results if r["task"] == "perplexity")
        header += f", perplexity over {scored} tokens of {args.data.name}"
    print(header)
    print(table(results, blends))
    if args.output is not None:
        report = {"model": args.model, "yarn": args.yarn, "seed": args.seed, "position_blends": blends,
                  "results": results}
        with atomic_file(args.output) as tmp:
            tmp.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.output}")


def main(argv=None) -> None:
    _cli.run(command, argv)


if __name__ == "__main__":
    main()
