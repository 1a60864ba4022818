"""Fine-tune a RePo model: ``python -m repo_mlx.lora --model M --train --data DIR``.

mlx-lm's ``mlx_lm.lora`` flags, data formats and ``-c config.yaml``, plus
``--position-module`` and exact resumption. Data parallel: run the same
command under ``mlx.launch`` (see docs/finetune.md).
"""

import math
import os
import signal
import sys
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import yaml
from mlx_lm import lora as _mlx_lm_lora
from mlx_lm.tuner.callbacks import get_reporting_callbacks
from mlx_lm.tuner.trainer import evaluate
from mlx_lm.tuner.utils import print_trainable_parameters
from mlx_lm.utils import save_config

from . import _cli, tuner
from .errors import LoadError, one_line
from .utils import DEFAULT_MODEL, load

CONFIG_DEFAULTS = {
    **_mlx_lm_lora.CONFIG_DEFAULTS,
    "model": DEFAULT_MODEL,
    "data": None,  # mlx-lm's default dataset needs the Hub; ask instead
    # Frozen by default: see docs/finetune.md, "The position module".
    "position_module": "frozen",
}
POSITIVE = (
    "batch_size", "iters", "steps_per_report", "steps_per_eval", "save_every",
    "max_seq_length", "grad_accumulation_steps",
)


def _set_help(parser, flag: str, text: str) -> None:
    # argparse has no public way to edit an inherited flag's help.
    for action in parser._actions:
        if flag in action.option_strings:
            action.help = text


def build_parser():
    p = _mlx_lm_lora.build_parser()
    p.prog = "python -m repo_mlx.lora"
    p.description = (
        "LoRA, QLoRA (on a 4-bit converted model), DoRA or full fine-tuning of a "
        "RePo-OLMo2 model, with the position module frozen, LoRA-adapted or fully "
        "trained. Flags, data formats and -c config.yaml as in mlx_lm.lora; a flag "
        "given on the command line overrides the config file."
    )
    _set_help(p, "--model", f"Model folder (official Hugging Face or converted, e.g. 4-bit for QLoRA) or Hub id (default: {DEFAULT_MODEL}).")
    _set_help(p, "--data", "Folder with train.jsonl, valid.jsonl (optional) and test.jsonl (for --test); each line a JSON object with 'text', 'prompt'/'completion' or chat 'messages'. A Hub dataset id also works when online.")
    _set_help(p, "--num-layers", "Tune the last N layers (default: 16, all of the 1B; -1 for all).")
    _set_help(p, "--iters", "Total iterations to train for, counting those of a resumed checkpoint (default: 1000).")
    _set_help(p, "--learning-rate", "Learning rate (default: 1e-5).")
    _set_help(p, "--adapter-path", "Folder for adapter_config.json, adapters.safetensors, numbered checkpoints and their .state files (default: adapters).")
    _set_help(p, "--resume-adapter-file", "Continue from this checkpoint (adapters.safetensors or NNNNNNN_adapters.safetensors): weights, and from its .state.safetensors file the optimizer state and iteration, so the run goes on exactly as if uninterrupted.")
    _set_help(p, "--save-every", "Save a checkpoint every N iterations (default: 100).")
    _set_help(p, "--seed", "Seed for LoRA initialisation, data order and dropout (default: 0).")
    _set_help(p, "--trust-remote-code", "Accepted for mlx_lm.lora compatibility; RePo needs no remote code.")
    p.add_argument(
        "--position-module",
        choices=tuner.POSITION_MODULE_CHOICES,
        default=None,
        help="What happens to the RePo position module (gate_map, content_map, "
        "final_map) in the tuned layers: frozen (default: keeps the positions "
        "learned in pre-training), lora (adapt it like the other linears) or full "
        "(train its weights).",
    )
    return p


def parse_args(argv=None) -> types.SimpleNamespace:
    args = vars(build_parser().parse_args(argv))
    if args["config"]:
        try:
            with open(args["config"]) as f:
                config = yaml.load(f, _mlx_lm_lora.yaml_loader)
        except OSError as e:
            raise LoadError(f"Cannot read config {args['config']}: {e.strerror}.") from None
        except yaml.YAMLError as e:
            raise LoadError(f"{args['config']} is not valid YAML: {one_line(e)}") from None
        if not isinstance(config, dict):
            raise LoadError(f"{args['config']} must hold a mapping of option names to values.")
        for k, v in config.items():
            if args.get(k) is None:
                args[k] = v
    for k, v in CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    for k in POSITIVE:
        if not isinstance(args[k], int) or args[k] < 1:
            raise LoadError(f"--{k.replace('_', '-')} must be a positive integer, got {args[k]!r}.")
    if args["save_every"] % args["grad_accumulation_steps"]:
        raise LoadError("--save-every must be a multiple of --grad-accumulation-steps.")
    if not isinstance(args["seed"], int) or args["seed"] < 0:
        raise LoadError(f"--seed must be a non-negative integer, got {args['seed']!r}.")
    if args["batch_size"] % mx.distributed.init().size():
        raise LoadError("--batch-size must be divisible by the number of processes.")
    return types.SimpleNamespace(**args)


def rprint(*a, **kw):
    if mx.distributed.init().rank() == 0:
        print(*a, **kw, flush=True)


def train_model(args, model, train_set, valid_set, callback=None):
    mx.random.seed(args.seed)  # LoRA initialisation
    args.lora_parameters = tuner.setup_trainable(
        model, args.fine_tune_type, args.num_layers, args.lora_parameters, args.position_module
    )
    if any(layer.self_attn.repo for layer in model.layers):
        rprint(f"Position module: {args.position_module}")
    optimizer = tuner.build_optimizer(args)
    start = trained = 0
    if args.resume_adapter_file is not None:
        start, trained = tuner.resume(model, optimizer, args.resume_adapter_file, args)
        rprint(f"Resuming from {args.resume_adapter_file} at iteration {start}")
        if start >= args.iters:
            raise LoadError(
                f"{args.resume_adapter_file} is from iteration {start}; pass an --iters above it."
            )
    print_trainable_parameters(model)
    adapter_path = Path(args.adapter_path)
    if mx.distributed.init().rank() == 0:
        adapter_path.mkdir(parents=True, exist_ok=True)
        save_config(dict(vars(args)), adapter_path / "adapter_config.json")
    tuner.train(
        model,
        optimizer,
        train_set,
        valid_set,
        args,
        adapter_path / "adapters.safetensors",
        start=start,
        trained=trained,
        callback=callback,
    )


def run(args) -> None:
    np.random.seed(args.seed)
    if not args.train and not args.test:
        raise LoadError("Pass --train, --test or both.")
    rprint(f"Loading {args.model}")
    model, tokenizer = load(args.model)
    train_set, valid_set, test_set = tuner.load_data(args, tokenizer)
    if args.train:
        try:
            callback = get_reporting_callbacks(
                args.report_to, args.project_name, args.adapter_path, vars(args)
            )
        except (ValueError, ImportError) as e:
            raise LoadError(f"--report-to: {one_line(e)}") from None
        train_model(args, model, train_set, valid_set, callback)
    elif args.adapter_path:
        if Path(args.adapter_path, "adapter_config.json").exists():
            tuner.load_adapters(model, args.adapter_path)
        else:
            rprint(f"No adapters in {args.adapter_path}: testing the base model")
    if args.test:
        loss = evaluate(model, test_set, args.batch_size, args.test_batches, args.max_seq_length)
        rprint(f"Test loss {loss:.3f}, Test ppl {math.exp(loss):.3f}.")


def main(argv=None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # A kill still runs cleanup; checkpoints are written by rename, never torn.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run(parse_args(argv))


if __name__ == "__main__":
    _cli.run(main)
