"""Standard benchmarks through lm-evaluation-harness: ``python -m repo_mlx.lm_eval``.

mlx-lm's lm-eval adapter (``mlx_lm.evaluate.MLXLM``) runs the RePo model once per
position blend, as in ``repo_mlx.evaluate``. Needs ``pip install "repo-mlx[eval]"``
(lm-eval; no PyTorch).
"""

import argparse
import json
import logging
import os
from importlib.metadata import version
from pathlib import Path
from typing import Dict, List

from . import _cli, tasks
from .errors import LoadError, one_line
from .loader import check_hub_reachable
from .rope import set_position_blend
from .files import atomic_file

try:
    import lm_eval
    from lm_eval.api.model import LM
    from mlx_lm.evaluate import MLXLM
except ImportError:  # the optional extra is not installed; main() says so
    lm_eval = None
    MLXLM = object

# The paper's general-task set (its table of general benchmarks), as lm-eval names them.
PAPER_TASKS = ("mmlu_pro", "arc_easy", "arc_challenge", "boolq", "coqa", "drop", "hellaswag", "triviaqa")


class RePoLM(MLXLM):
    """mlx-lm's lm-eval adapter around a model and tokenizer already loaded."""

    def __init__(self, model, tokenizer, max_tokens=None, batch_size=8, sampler=None):
        # MLXLM.__init__ loads with mlx_lm.load, which cannot build a RePo model;
        # these are the attributes it sets.
        LM.__init__(self)
        self._model, self.tokenizer, self._sampler = model, tokenizer, sampler
        self._max_tokens, self._batch_size = max_tokens, batch_size
        self.use_chat_template = False  # base models; lm-eval's tasks are plain text


def load_tasks(names: List[str], include_path):
    """lm-eval's TaskManager, after loading every task once (which downloads its data)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in include_path] or None)
    for name in names:
        try:
            manager.load([name])
        except KeyError:
            raise LoadError(
                f"Unknown task {name!r}: not an lm-eval task, group or tag (list them with "
                "`lm-eval ls tasks`) nor a task in --include-path."
            ) from None
        except Exception as e:
            raise LoadError(
                f"Cannot load the data of task {name!r} ({type(e).__name__}: {one_line(e)[:200]}); "
                "lm-eval's tasks download their data sets from the Hugging Face Hub: connect once "
                "(they are cached for later runs) or use local tasks with --include-path."
            ) from None
    return manager


def table(results: Dict[float, dict], blends: List[float]) -> str:
    """One row per task and metric, one column per position blend."""
    # Metrics are "name,filter"; sample_len and the like have no filter.
    rows = [(task, key) for task, metrics in results[blends[0]].items() for key, value in metrics.items()
            if "," in key and isinstance(value, (int, float)) and "_stderr" not in key]
    cols = [_cli.blend_name(b) for b in blends]
    lines = [f"| task | metric | {' | '.join(cols)} |", "|---|---|" + "---:|" * len(cols)]
    for task, key in rows:
        metric, _, filt = key.partition(",")
        cells = []
        for b in blends:
            r = results[b][task]
            se = r.get(f"{metric}_stderr,{filt}")
            cells.append(f"{r[key]:.4f}" + (f" ± {se:.4f}" if isinstance(se, float) else ""))
        name = metric if filt in ("", "none") else f"{metric} ({filt})"
        lines.append(f"| {r.get('alias', task).strip()} | {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        elsewhere={f: "that is a flag of python -m repo_mlx.evaluate, RePo's long-context tasks and perplexity"
                   for f in ("--task", "--data", "--window", "--stride", "--lengths", "--samples", "--output")},
        prog="python -m repo_mlx.lm_eval",
        description="Evaluate a RePo model on lm-evaluation-harness tasks (the paper's general set: "
        + ", ".join(PAPER_TASKS) + "), optionally with learned positions and plain RoPE side by side.",
    )
    _cli.add_model_flags(p, yarn=True)
    p.add_argument("--tasks", required=True, nargs="+", help="lm-eval tasks, groups or tags, separated by spaces (as mlx_lm.evaluate) or commas, e.g. arc_easy hellaswag.")
    _cli.add_blends_flag(p)
    p.add_argument("--limit", type=_cli.positive_int, default=None, help="Evaluate only the first N examples of each task (default: all).")
    p.add_argument("--num-shots", type=_cli.non_negative_int, default=None, help="Few-shot examples per prompt (default: each task's own).")
    p.add_argument("--batch-size", type=_cli.positive_int, default=8, help="Sequences generated at once for generate_until tasks (default: 8).")
    p.add_argument("--max-tokens", type=_cli.positive_int, default=None, help="Context cut for scoring and tokens to generate, over the tasks' own (default: the tasks').")
    p.add_argument("--output-dir", type=_cli.output_dir, default=None, help="Also write the results (and with --log-samples every sample) as JSON in this folder.")
    p.add_argument("--log-samples", action="store_true", help="With --output-dir: include every sample's prompt, model answers and scores.")
    p.add_argument("--include-path", type=_cli.existing_dir, action="append", default=[], help="A folder of your own lm-eval task YAML files; may be repeated.")
    p.add_argument("--seed", type=_cli.seed, default=123, help="Seed for few-shot sampling and lm-eval's shuffles (default: 123, as mlx_lm.evaluate).")
    _cli.add_trust_remote_code(p)
    return p


def command(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if lm_eval is None:
        raise LoadError('lm-evaluation-harness is not installed: pip install "repo-mlx[eval]" (or pip install lm-eval).')
    names = [t.strip() for arg in args.tasks for t in arg.split(",") if t.strip()]
    if ours := [t for t in names if t in ("ruler", "perplexity", *tasks.TASKS)]:
        raise LoadError(f"{ours[0]} is a task of python -m repo_mlx.evaluate (RePo's long-context tasks and perplexity); "
                        "this command runs lm-eval's.")
    if not names:
        raise LoadError("--tasks names no task; give e.g. arc_easy,hellaswag.")
    if args.log_samples and args.output_dir is None:
        raise LoadError("--log-samples needs --output-dir: the samples are written there, not printed.")
    blends = _cli.parse_blends(args.position_blend)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    if not args.include_path:  # tasks of your own may need no Hub
        check_hub_reachable("lm-eval's tasks' data")
    manager = load_tasks(names, args.include_path)  # before the model: fail fast

    model, tokenizer = _cli.load_from_args(args)
    lm = RePoLM(model, tokenizer, max_tokens=args.max_tokens, batch_size=args.batch_size)
    results, samples = {}, {}
    for blend in blends:
        print(f"{_cli.blend_name(blend)}: {', '.join(names)}", flush=True)
        set_position_blend(model, blend)
        seeds = {f"{k}random_seed": args.seed for k in ("", "numpy_", "torch_", "fewshot_")}
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=args.num_shots,
                                      limit=args.limit, **seeds)
        results[blend], samples[blend] = out["results"], out.get("samples", {})

    shots = "tasks' own shots" if args.num_shots is None else f"{args.num_shots} shots"
    limit = f", first {args.limit} examples per task" if args.limit else ""
    print(f"\nmodel {args.model}, lm-eval {version('lm_eval')}, {shots}{limit}, "
          f"YaRN {'x%g' % args.yarn if args.yarn else 'off'}")
    print(table(results, blends))
    if args.output_dir is not None:
        report = {"model": args.model, "tasks": names, "num_shots": args.num_shots, "limit": args.limit,
                  "yarn": args.yarn, "lm_eval_version": version("lm_eval"), "position_blends": blends,
                  "results": {str(b): results[b] for b in blends}}
        if args.log_samples:
            report["samples"] = {str(b): samples[b] for b in blends}
        path = args.output_dir / (f"lm_eval_{Path(args.model).name}_{'_'.join(names)}"[:200] + ".json")
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {path}")


def main(argv=None) -> None:
    _cli.run(command, argv)


if __name__ == "__main__":
    main()
