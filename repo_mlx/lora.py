"""Fine-tune a RePo model: ``python -m repo_mlx.lora --model M --train --data DIR``.

mlx-lm's ``mlx_lm.lora`` flags, data formats and ``-c config.yaml``, plus ``--position-module``,
preference tuning and exact resumption; data parallel under ``mlx.launch`` (docs/finetune.md).
"""

import math
import os
import shutil
import types
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm import lora as _mlx_lm_lora
from mlx_lm.cli_ui import rprint
from mlx_lm.tuner.callbacks import get_reporting_callbacks
from mlx_lm.tuner.trainer import evaluate

from . import _cli, finetune, preference
from .finetune_data import load_data
from .adapters import POSITION_MODULE_CHOICES, load_adapters
from .errors import LoadError, one_line
from .files import check_outputs, remove_stale
from .loader import DEFAULT_MODEL, load

CONFIG_DEFAULTS = {
    **_mlx_lm_lora.CONFIG_DEFAULTS,
    "model": DEFAULT_MODEL,
    "data": None,  # mlx-lm's default dataset needs the Hub; ask instead
    # Frozen by default: see docs/finetune.md, "The position module".
    "position_module": "frozen",
    "num_layers": None,  # mlx-lm's 16, or all layers of a smaller model
    "force": False,
    # Preference tuning (preference.py); mlx-lm-lora's flag names.
    "train_mode": "sft",
    "beta": 0.1,
    "dpo_loss_type": "sigmoid",
    "reference_model_path": None,
}
# Checked while parsing, and the same checks for values from -c config.yaml.
TYPES = {
    **dict.fromkeys(["batch_size", "iters", "steps_per_report", "steps_per_eval", "save_every", "max_seq_length",
                     "grad_accumulation_steps"], _cli.positive_int),
    **dict.fromkeys(["num_layers", "val_batches", "test_batches"], _cli.all_or_positive),
    "learning_rate": _cli.positive_float,
    "clear_cache_threshold": _cli.byte_size,
    "seed": _cli.seed,
    "resume_adapter_file": _cli.existing_file,
    "adapter_path": _cli.output_dir,
    "config": _cli.existing_file,
}
# Files a training run writes into --adapter-path (what --force replaces).
RUN_FILES = ("adapter_config.json", "adapters.safetensors", "*_adapters.safetensors", "*.state.safetensors")
# Our help where the parent's does not fit (argparse has no public way to edit an inherited flag's help).
HELP = {
    "model": f"Model folder (official Hugging Face or converted, e.g. 4-bit for QLoRA) or Hub id (default: {DEFAULT_MODEL}).",
    "data": "Folder with train.jsonl, valid.jsonl (optional) and test.jsonl (for --test); each line a JSON object with 'text', 'prompt'/'completion' or chat 'messages'. A Hub dataset id also works when online.",
    "num_layers": "Tune the last N layers, -1 for all (default: 16, all of the 1B; all of a model with fewer).",
    "optimizer": "Optimizer: adam, adamw, muon, sgd or adafactor (default: adam).",
    "val_batches": "Validation batches, -1 for the whole validation set (default: 25).",
    "test_batches": "Test batches, -1 for the whole test set (default: 500).",
    "iters": "Total iterations to train for, counting those of a resumed checkpoint (default: 1000).",
    "learning_rate": "Learning rate (default: 1e-5).",
    "adapter_path": "Folder for adapter_config.json, adapters.safetensors, numbered checkpoints and their .state files (default: adapters).",
    "resume_adapter_file": "Continue from this checkpoint (adapters.safetensors or NNNNNNN_adapters.safetensors): weights, and from its .state.safetensors file the optimizer state and iteration, so the run goes on exactly as if uninterrupted.",
    "save_every": "Save a checkpoint every N iterations (default: 100).",
    "seed": "Seed for LoRA initialisation, data order and dropout (default: 0).",
    "trust_remote_code": "Accepted as in mlx_lm.lora, and has no effect: repo_mlx carries the RePo model code.",
}


def build_parser():
    p = _cli.ArgumentParser(
        prog="python -m repo_mlx.lora",
        description="LoRA, QLoRA (on a 4-bit converted model), DoRA or full fine-tuning of a "
        "RePo model (OLMo-2, Llama or Qwen3), with the position module frozen, LoRA-adapted or fully "
        "trained. Flags, data formats and -c config.yaml as in mlx_lm.lora; a flag "
        "given on the command line overrides the config file.",
        parents=[_mlx_lm_lora.build_parser()],
        conflict_handler="resolve",  # the parent's -h replaces ours
    )
    for action in p._actions:
        action.type = TYPES.get(action.dest, action.type)
        action.help = HELP.get(action.dest, action.help)
    p.add_argument(
        "--force", action="store_true", default=None,
        help="Train into an --adapter-path that holds an earlier run, replacing its "
        "adapters and numbered checkpoints (without it, such a folder is refused; "
        "resuming from a checkpoint in it needs no --force).",
    )
    p.add_argument(
        "--position-module", choices=POSITION_MODULE_CHOICES, default=None,
        help="What happens to the RePo position module (gate_map, content_map, "
        "final_map) in the tuned layers: frozen (default: keeps the positions "
        "learned in pre-training), lora (adapt it like the other linears) or full "
        "(train its weights).",
    )
    p.add_argument(
        "--train-mode", choices=preference.TRAIN_MODES, default=None,
        help="sft (default: the data's text or completions), or preference tuning on "
        "'prompt'/'chosen'/'rejected' lines: dpo or orpo (see docs/finetune.md).",
    )
    p.add_argument(
        "--beta", type=_cli.positive_float, default=None,
        help="DPO: how closely the model keeps to the reference (higher: closer); ORPO: the "
        "weight of the odds-ratio term (default: 0.1).",
    )
    p.add_argument("--dpo-loss-type", choices=preference.DPO_LOSS_TYPES, default=None, help="DPO loss: sigmoid (default), hinge or ipo.")
    p.add_argument(
        "--reference-model-path", default=None,
        help="DPO reference model, folder or Hub id (default: the base; with LoRA/DoRA the "
        "model with its adapters off, with full fine-tuning a frozen copy).",
    )
    return p


def parse_args(argv=None) -> types.SimpleNamespace:
    # Paths as strings: adapter_config.json records them.
    args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(build_parser().parse_args(argv)).items()}
    if args["config"]:
        config = _cli.read_config(args["config"], build_parser(), set(CONFIG_DEFAULTS) | set(args))
        for k, v in config.items():
            if args.get(k) is None:
                args[k] = v
    for k, v in CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    if args["save_every"] % args["grad_accumulation_steps"]:
        raise LoadError("--save-every must be a multiple of --grad-accumulation-steps.")
    check_outputs({"--adapter-path": args["adapter_path"]}, {"--model": args["model"], "--data": args["data"]}, False, set())
    if args["train"]:
        check_adapter_path(args)
    if args["batch_size"] % mx.distributed.init().size():
        raise LoadError("--batch-size must be divisible by the number of processes.")
    return types.SimpleNamespace(**args)


def check_adapter_path(args: dict) -> None:
    """Refuse to mix a new run into an older one's checkpoints unless --force. A folder without
    adapter weights (a run stopped before its first save) holds no run: its leftovers are cleared."""
    path = Path(args["adapter_path"])
    if not path.is_dir():
        return
    remove_stale(path)
    run = list(path.glob("*adapters.safetensors"))
    old = [f for pattern in RUN_FILES for f in path.glob(pattern)]
    if not old and any(path.iterdir()):
        raise LoadError(f"--adapter-path {path} holds files that are not a lora run; name a new folder for the adapters.")
    resume = args["resume_adapter_file"]
    resuming_here = resume is not None and Path(resume).resolve().parent == path.resolve()
    if run and not resuming_here and not args["force"]:
        raise LoadError(
            f"--adapter-path {path} holds an earlier run ({len(old)} files); continue it with --resume-adapter-file "
            f"{path / 'adapters.safetensors'}, replace it with --force, or name another folder."
        )
    if not resuming_here and mx.distributed.init().rank() == 0:
        for f in old:
            f.unlink()


def run(args) -> None:
    np.random.seed(args.seed)
    if not args.train and not args.test:
        raise LoadError("Pass --train, --test or both.")
    folder = Path(args.adapter_path)
    fresh = args.train and not folder.exists()
    try:
        tune(args)
    except LoadError:
        # A new run stopped before its first checkpoint (bad data, divergence) leaves nothing.
        if fresh and not (folder / "adapters.safetensors").exists() and mx.distributed.init().rank() == 0:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def tune(args) -> None:
    rprint(f"Loading {args.model}", flush=True)
    model, tokenizer = load(args.model)
    pairs = args.train_mode != "sft"
    train_set, valid_set, test_set = (preference.load_data if pairs else load_data)(args, tokenizer)
    loss = None
    if args.train:
        try:
            callback = get_reporting_callbacks(args.report_to, args.project_name, args.adapter_path, vars(args))
        except (ValueError, ImportError) as e:
            raise LoadError(f"--report-to: {one_line(e)}") from None
        finetune.setup(args, model)
        loss = preference.loss_for(args, model, tokenizer) if pairs else finetune.token_weighted_loss
        trainer, trained = finetune.start(args, model, loss)
        train = partial(preference.train, loss=loss) if pairs else finetune.train
        train(trainer, train_set, valid_set, args, Path(args.adapter_path) / "adapters.safetensors",
              trained=trained, callback=callback)
    elif Path(args.adapter_path, "adapter_config.json").exists():
        load_adapters(model, args.adapter_path)
    else:
        rprint(f"No adapters in {args.adapter_path}: testing the base model", flush=True)
        model.freeze()  # DPO's reference is then the model itself
    if args.test and pairs:
        preference.test(args, model, tokenizer, test_set, loss)
    elif args.test:
        loss = evaluate(model, test_set, args.batch_size, args.test_batches, args.max_seq_length)
        rprint(f"Test loss {loss:.3f}, Test ppl {math.exp(loss):.3f}.", flush=True)


def command(argv=None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    run(parse_args(argv))


def main(argv=None) -> None:
    """The command line: bad input is one ``error:`` line and exit status 2."""
    _cli.run(command, argv)


if __name__ == "__main__":
    main()
