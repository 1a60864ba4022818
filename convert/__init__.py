"""Convert an official RePo checkpoint to MLX: ``python -m repo_mlx.convert``.

The output folder also loads in stock mlx-lm (``--trust-remote-code``): it
carries the model file and names it in config.json's ``model_file``.
"""

import argparse
import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Iterator, Optional

import mlx.core as mx
from mlx_lm.utils import quantize_model, save, upload_to_hub

from .. import repo_olmo2, rope
from ..repo_olmo2 import POSITION_WEIGHTS
from ..errors import LoadError
from ..utils import DTYPES, get_model_path, load_model, load_tokenizer

MODEL_FILE = "repo_olmo2.py"
# Files a converted folder carries so it runs without repo_mlx installed (and,
# on a Mac, with the Metal kernels: repo_rope.py looks for metal/ beside it).
STANDALONE_FILES = {
    MODEL_FILE: repo_olmo2.__file__,
    "repo_rope.py": rope.__file__,
    "metal/rope.metal": rope.metal_source_path(),
}


def save_standalone(folder: Path, src: Path, model, tokenizer, config: dict, donate_model=True) -> None:
    """mlx-lm's ``save`` plus the model file, named in config, so stock mlx-lm loads it."""
    config["model_file"] = MODEL_FILE
    save(folder, src, model, tokenizer, config, donate_model=donate_model)
    for name, source in STANDALONE_FILES.items():
        if source is not None:
            (folder / name).parent.mkdir(exist_ok=True)
            shutil.copy(source, folder / name)


def keep_unquantized(path: str, module) -> bool:
    """The position module stays in float: 4-bit positions drift (see README)."""
    return path.split(".")[-1] not in POSITION_WEIGHTS


@contextlib.contextmanager
def atomic_folder(dst: Path, force: bool) -> Iterator[Path]:
    """Yield a scratch folder that becomes ``dst`` only if the block succeeds."""
    if dst.exists() and not force:
        raise LoadError(f"{dst} already exists; pass --force to replace it.")
    if dst.exists() and not dst.is_dir():
        raise LoadError(f"{dst} exists and is not a folder.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert(
    hf_path: str,
    mlx_path: str = "mlx_model",
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    upload_repo: Optional[str] = None,
    force: bool = False,
    revision: Optional[str] = None,
) -> Path:
    dst = Path(mlx_path)
    if dst.exists() and not force:  # fail before any download or compute
        raise LoadError(f"{dst} already exists; pass --force to replace it.")
    print(f"[INFO] Loading {hf_path}")
    src = get_model_path(hf_path, revision)
    model, config = load_model(src, lazy=True)
    tokenizer = load_tokenizer(src, eos_token_ids=config.get("eos_token_id"))
    if dtype is None:
        dtype = config.get("torch_dtype")
    if dtype is not None:
        if dtype not in DTYPES:
            raise LoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
        print(f"[INFO] Using dtype: {dtype}")
        config["torch_dtype"] = dtype
        model.set_dtype(getattr(mx, dtype))
    if quantize:
        print(f"[INFO] Quantizing to {q_bits} bits, group size {q_group_size}")
        model, config = quantize_model(
            model, config, q_group_size, q_bits, quant_predicate=keep_unquantized
        )
    with atomic_folder(dst, force) as tmp:
        print(f"[INFO] Saving to {dst}")
        save_standalone(tmp, src, model, tokenizer, config)
    if upload_repo is not None:
        print(f"[INFO] Uploading to {upload_repo}")
        try:
            upload_to_hub(str(dst), upload_repo)
        except Exception as e:
            raise LoadError(
                f"Upload to {upload_repo} failed ({type(e).__name__}); the converted "
                f"model is complete in {dst}. Log in with `hf auth login` and retry."
            ) from None
    return dst


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m repo_mlx.convert",
        description="Convert an official RePo-OLMo2 Hugging Face checkpoint to MLX "
        "(float or quantized). The result loads in repo_mlx and in stock mlx-lm "
        "with --trust-remote-code.",
    )
    p.add_argument("--hf-path", "--model", required=True, help="Source: local Hugging Face folder or Hub id.")
    p.add_argument("--mlx-path", default="mlx_model", help="Output folder (default: mlx_model).")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the float weights (default: config's torch_dtype).")
    p.add_argument("-q", "--quantize", action="store_true", help="Quantize the linear layers and embeddings (the position module stays float).")
    p.add_argument("--q-bits", type=int, choices=[4, 8], default=4, help="Bits per quantized weight (default: 4).")
    p.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64, help="Weights per quantization group (default: 64).")
    p.add_argument("--upload-repo", default=None, help="Also upload the result to this Hub repo (needs a login).")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --hf-path.")
    p.add_argument("--force", action="store_true", help="Replace --mlx-path if it exists (only once the new one is complete).")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    # A kill must still run the cleanup that keeps a half-written folder away.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    convert(**vars(args))
    print(f"[INFO] Done: {args.mlx_path}")
