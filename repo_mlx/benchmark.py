"""Speed and memory to paste into a bug report: ``python -m repo_mlx.benchmark``.

Like ``mlx_lm.benchmark``, RePo against mlx-lm's plain model on the same weights, alternating ABBA.
"""

import argparse
import os
import platform
import sys
import time
from importlib.metadata import version

import mlx.core as mx
from mlx.utils import tree_flatten

from . import _cli, kernel_checks
from .errors import LoadError
from .generation import add_kv_flags, check_kv_bits
from .limits import check_length, check_tokens_fit
from .loader import DTYPES, architecture_name, load
from .repo_olmo2 import Model, ModelArgs
from .rope import pe_config
from .speed import alternate, run_batch, run_single


def olmo2_config(hidden: int, layers: int, heads: int, mlp: int, vocab: int, repo_from: int) -> dict:
    """An official RePo-OLMo2 config of these sizes."""
    return {
        "model_type": "olmo2", "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "intermediate_size": mlp,
        "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "pe_config": pe_config(repo_from),
    }  # fmt: skip


SHAPES = {"1b": olmo2_config(2048, 16, 16, 8192, 100352, 5), "tiny": olmo2_config(64, 4, 4, 128, 320, 1)}
SHAPE_NAMES = {"1b": "the released 1B's shape (16 layers of 2048, RePo from layer 5)", "tiny": "the tiny test shape"}


def machine() -> dict:
    info = mx.device_info()
    memory = info.get("memory_size") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    system = platform.mac_ver()[0] and f"macOS {platform.mac_ver()[0]}" or platform.platform()
    return {
        "chip": info.get("device_name") or platform.processor() or platform.machine(),
        "memory": f"{memory / 2**30:.0f} GiB",
        "os": f"{system} ({platform.machine()})",
    }


def report(args, where: str, n_params: int, n_position: int, dtype: str, medians, ratio, spread) -> str:
    plain = next(k for k in medians if k != "RePo")  # the architecture's name
    rows = [("RePo (repo_mlx)", medians["RePo"]), (f"{plain} (mlx-lm, same weights)", medians[plain])]
    lines = [
        "### repo_mlx benchmark",
        "",
        "| model | prompt tok/s | generation tok/s | peak memory (GB) |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {p:.1f} | {g:.1f} | {m:.3f} |" for name, (p, g, m) in rows),
        f"| **ratio RePo / {plain}** | {ratio[0]:.3f} | {ratio[1]:.3f} | {ratio[2]:.3f} |",
        "",
    ]
    kv = f"{args.kv_bits}-bit (group {args.kv_group_size})" if args.kv_bits else "not quantized"
    m = machine()
    lines += [
        f"- model: {where}, {dtype}, {n_params / 1e6:.1f}M parameters ({100 * n_position / n_params:.2f}% position module)",
        f"- run: prompt {args.prompt_tokens} tokens, {args.generation_tokens} generated, batch {args.batch_size}, "
        f"KV cache {kv}, prefill step {args.prefill_step_size}; {args.num_trials} trial{'s' * (args.num_trials > 1)} after a warm-up, "
        "ABBA order, medians; ratio = median of per-trial ratios",
        f"- per-trial ratios: prompt {spread[0][0]:.3f} to {spread[0][1]:.3f}, generation {spread[1][0]:.3f} to {spread[1][1]:.3f}",
        f"- machine: {m['chip']}, {m['memory']}, {m['os']}",
        f"- software: Python {platform.python_version()}, mlx {version('mlx')}, mlx-lm {version('mlx-lm')}, "
        f"repo_mlx {_cli.version()}",
        f"- device: {'gpu' if mx.default_device() == mx.gpu else 'cpu'}; Metal rotary kernels: {kernel_checks.kernel_status()}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m repo_mlx.benchmark",
        description="Prompt and generation tokens/s and peak memory of a RePo model and of the plain "
        "model of its architecture (mlx-lm) on the same weights, with the machine, as Markdown to paste into a bug report.",
    )
    p.add_argument("--model", default=None, help="Model folder or Hub id (default: a random model, see --shape; no download).")
    p.add_argument("--shape", choices=sorted(SHAPES), help="Shape of the random model without --model (default: 1b, the released model's, on a Metal GPU; tiny on a CPU, where a 1B trial takes minutes).")
    p.add_argument("--prompt-tokens", "-p", type=_cli.token_count, default=512, help="Prompt length in tokens (default: 512).")
    p.add_argument("--generation-tokens", "-g", type=_cli.int_range(2, _cli.MAX_TOKENS), default=128, help="Tokens to generate, at least 2 (default: 128).")
    p.add_argument("--batch-size", "-b", type=_cli.positive_int, default=1, help="Prompts generated together (mlx-lm's batch_generate) (default: 1).")
    p.add_argument("--num-trials", "-n", type=_cli.positive_int, default=5, help="Timed trials per model after a warm-up (default: 5).")
    add_kv_flags(p, start=False)  # quantized from the first token; batch size 1 only
    p.add_argument("--delay", type=_cli.non_negative_int, default=0, help="Seconds to wait before each timed run, e.g. to let the machine cool (default: 0).")
    p.add_argument("--quantize-activations", "-qa", action="store_true", help="Quantize activations as the weights are (a --model converted with --q-mode nvfp4 or mxfp8).")
    p.add_argument("--pipeline", action="store_true", help="mlx-lm's pipeline parallelism over mlx.launch processes; refused: the benchmark runs on one machine.")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="Compute dtype (default: the checkpoint's; bfloat16 for the random model).")
    _cli.add_trust_remote_code(p)
    return p


def command(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.pipeline:
        raise LoadError("--pipeline is not supported: the benchmark runs the model on one machine.")
    if args.kv_bits is not None and args.batch_size > 1:
        raise LoadError("--kv-bits works with --batch-size 1 only: mlx-lm's batch generation has no quantized KV cache.")
    if args.model is None:
        if args.shape is None:  # said, as it depends on the machine
            args.shape = "1b" if mx.metal.is_available() else "tiny"
            print(f"Building a random model in {SHAPE_NAMES[args.shape]}", file=sys.stderr, flush=True)
        model = Model(ModelArgs.from_dict(SHAPES[args.shape]))
        model.set_dtype(getattr(mx, args.dtype or "bfloat16"))
        mx.eval(model.parameters())
        where = f"random weights in {SHAPE_NAMES[args.shape]}"
    else:
        model, _ = load(args.model, dtype=args.dtype, model_config={"quantize_activations": args.quantize_activations})
        where = f"`{args.model}`"
    args.kv_group_size = check_kv_bits(model, args.kv_bits, args.kv_group_size)
    check_length(model, args.prompt_tokens, args.generation_tokens, what="--prompt-tokens")
    check_tokens_fit(model, args.prompt_tokens + args.generation_tokens, "--prompt-tokens", args.batch_size)
    plain = kernel_checks.plain_twin(model)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    n_position = n_params - sum(v.size for _, v in tree_flatten(plain.parameters()))
    dtype = str(model.model.norm.weight.dtype).replace("mlx.core.", "")

    mx.random.seed(0)
    prompt = mx.random.randint(0, model.args.vocab_size, (args.batch_size, args.prompt_tokens))
    run = run_single if args.batch_size == 1 else run_batch
    models = {"RePo": model, architecture_name(model): plain}
    medians, ratio, spread = alternate(models, lambda m: time.sleep(args.delay) or run(m, prompt, args), args.num_trials)
    print(report(args, where, n_params, n_position, dtype, medians, ratio, spread))


def main(argv=None) -> None:
    _cli.run(command, argv)


if __name__ == "__main__":
    main()
