"""Convert an official RePo checkpoint to MLX: ``python -m repo_mlx.convert``.

The output folder also loads in stock mlx-lm (``--trust-remote-code``): it
carries the model file and names it in config.json's ``model_file``.
"""

import argparse
from pathlib import Path
from typing import Optional

from mlx_lm.convert import QUANT_RECIPES, mixed_quant_predicate_builder
from mlx_lm.utils import quantize_model

from .. import _cli
from ..errors import LoadError
from ..files import atomic_folder
from ..rope import POSITION_WEIGHTS
from ..loader import (DTYPES, architecture_name, dequantized, get_model_path, load_config, load_model, load_tokenizer,
                      save_standalone, upload)


def keep_unquantized(path: str, module) -> bool:
    """The position module stays in float: 4-bit positions drift (see README)."""
    return path.split(".")[-1] not in POSITION_WEIGHTS


def check_all_quantized(model, config) -> None:
    """mlx-lm skips, silently, a layer whose width the group size does not divide."""
    q = config["quantization"]
    widths = sorted({m.weight.shape[-1] for path, m in model.named_modules()
                     if hasattr(m, "to_quantized") and keep_unquantized(path, m)})
    if widths:
        fits = [g for g in (16, 32, 64, 128) if all(w % g == 0 for w in widths)]
        fix = f"pick --q-group-size {' or '.join(map(str, fits))}" if fits else "no group size fits this model"
        raise LoadError(
            f"--q-group-size {q['group_size']} ({q.get('mode', 'affine')}) does not divide the width "
            f"{widths[0]} of this model's layers, which would stay float; {fix}."
        )


def model_card(name: str, hf_path: str, config: dict, license: Optional[str] = None) -> str:
    """The converted folder's README.md with mlx-lm's front matter (mlx-lm's own card is a
    stub, and its upload writes a recipe that stock mlx-lm cannot run without trust_remote_code)."""
    weights = f"{config.get('torch_dtype', 'float')} weights, not quantized"
    if q := config.get("quantization"):
        weights = (f"{q['bits']}-bit weights (group size {q['group_size']}); the position module "
                   "(gate_map, content_map, final_map) stays in float, as 4-bit positions drift")
    hub = not Path(hf_path).exists()
    front = [
        "---",
        "library_name: mlx",
        "pipeline_tag: text-generation",
        "tags:",
        "- mlx",
        "- repo",
        f"- {config['model_type']}",
        *([f"base_model: {hf_path}"] if hub else []),
        *([f"license: {license}"] if license else []),
        "---",
    ]
    source = f"[{hf_path}](https://huggingface.co/{hf_path})" if hub else f"`{Path(hf_path).name}`"
    return "\n".join(front) + f"""

# {name}

A RePo model (["Language Models with Context Re-Positioning"](https://arxiv.org/abs/2512.14391),
Sakana AI) in MLX format. RePo is {architecture_name(config)} in which the upper layers carry
a small position module (gate_map, content_map, final_map) that gives each token a learned,
real-valued position per {"head" if config["model_type"] == "olmo2" else "key/value head"};
queries and keys are rotated by those positions instead of by the token index.

Converted from {source} with repo_mlx {_cli.version()}: {weights}.

## Run with repo_mlx

```bash
pip install repo-mlx
python -m repo_mlx.generate --model {name} --prompt "The capital of France is"
```

```python
from repo_mlx import load, generate

model, tokenizer = load("{name}")
print(generate(model, tokenizer, "The capital of France is", max_tokens=32))
```

## Run with stock mlx-lm

The folder carries its model file (`{config["model_file"]}`, named by `model_file` in
config.json), so mlx-lm runs it without repo_mlx once you allow that file to run:

```bash
pip install mlx-lm
python -m mlx_lm generate --model {name} --trust-remote-code --prompt "The capital of France is"
```

```python
from mlx_lm import load, generate

model, tokenizer = load("{name}", trust_remote_code=True)
print(generate(model, tokenizer, "The capital of France is", max_tokens=32))
```

{"This is a base model: it continues text and has no chat template." if config["model_type"] == "olmo2" else "It keeps the source model's tokenizer and chat template."}

License: {f"{license}, as" if license else "that of"} the source checkpoint; see its model card.
"""


def _source_license(src: Path) -> Optional[str]:
    card = src / "README.md"
    if card.is_file():
        for line in card.read_text(errors="replace").split("\n---", 1)[0].splitlines():
            if line.startswith("license:"):
                return line.split(":", 1)[1].strip() or None
    return None


def convert(
    hf_path: str,
    mlx_path: str = "mlx_model",
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    q_mode: str = "affine",
    quant_predicate: Optional[str] = None,
    dequantize: bool = False,
    upload_repo: Optional[str] = None,
    force: bool = False,
    revision: Optional[str] = None,
) -> Path:
    """mlx-lm's convert for RePo checkpoints: the same options; the position module
    stays float when quantizing."""
    dst = Path(mlx_path)
    given = [f for f, v in (("--q-bits", q_bits), ("--q-group-size", q_group_size), ("--quant-predicate", quant_predicate),
                            ("--q-mode", q_mode if q_mode != "affine" else None)) if v is not None]
    if not quantize and given:
        raise LoadError(f"{given[0]} needs -q/--quantize; without it the weights stay in float.")
    if quantize and dequantize:
        raise LoadError("Choose one of -q/--quantize and -d/--dequantize.")
    if quant_predicate and q_mode != "affine":
        raise LoadError(f"--quant-predicate {quant_predicate} mixes affine bit widths; drop it or --q-mode {q_mode}.")
    if dst.exists() and not dst.is_dir():
        raise LoadError(f"--mlx-path {dst} exists and is not a folder.")
    if dst.exists() and not force:  # fail before any download or compute
        raise LoadError(f"{dst} already exists; pass --force to replace it.")
    print(f"[INFO] Loading {hf_path}")
    src = get_model_path(hf_path, revision)
    dtype = dtype or load_config(src).get("torch_dtype")
    model, config = load_model(src, dtype, lazy=True)  # refuses a dtype not in DTYPES
    tokenizer = load_tokenizer(src, eos_token_ids=config.get("eos_token_id"))
    if dtype is not None:
        print(f"[INFO] Using dtype: {dtype}")
        config["torch_dtype"] = dtype
    if quantize:
        mixed = mixed_quant_predicate_builder(quant_predicate, model, q_group_size or 64) if quant_predicate else None
        predicate = lambda path, m: keep_unquantized(path, m) and (mixed(path, m) if mixed else True)
        model, config = quantize_model(model, config, q_group_size, q_bits, mode=q_mode, quant_predicate=predicate)
        q = config["quantization"]
        print(f"[INFO] Quantized ({q.get('mode', 'affine')}): {quant_predicate or str(q['bits']) + ' bits'}, group size {q['group_size']}")
        check_all_quantized(model, config)
    if dequantize:
        print("[INFO] Dequantizing")
        model = dequantized(model, config)
    with atomic_folder(dst, force) as tmp:
        print(f"[INFO] Saving to {dst}")
        save_standalone(tmp, src, model, tokenizer, config)
        card = model_card(upload_repo or dst.name, hf_path, config, _source_license(src))
        (tmp / "README.md").write_text(card)
    if upload_repo is not None:
        upload(dst, upload_repo)
    return dst


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m repo_mlx.convert",
        description="Convert a RePo checkpoint (OLMo-2, Llama, Mistral or Qwen3) to MLX "
        "(float or quantized). The result loads in repo_mlx and in stock mlx-lm "
        "with --trust-remote-code.",
    )
    p.add_argument("--hf-path", "--model", required=True, help="Source: local Hugging Face folder or Hub id.")
    p.add_argument("--mlx-path", type=_cli.new_folder, default="mlx_model", help="Output folder (default: mlx_model); an existing one is replaced with --force, if repo_mlx wrote it.")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the float weights (default: config's torch_dtype).")
    p.add_argument("-q", "--quantize", action="store_true", help="Quantize the linear layers and embeddings (the position module stays float).")
    p.add_argument("--q-bits", type=int, choices=[2, 3, 4, 5, 6, 8], default=None, help="Bits per quantized weight, with -q (default: the --q-mode's, 4 for affine).")
    p.add_argument("--q-group-size", type=int, choices=[16, 32, 64, 128], default=None, help="Weights per quantization group, with -q (default: the --q-mode's, 64 for affine).")
    p.add_argument("--q-mode", choices=["affine", "mxfp4", "nvfp4", "mxfp8"], default="affine", help="Quantization format, as mlx-lm's (default: affine).")
    p.add_argument("--quant-predicate", choices=QUANT_RECIPES, default=None, help="mlx-lm's mixed-precision recipes (affine): e.g. mixed_4_6 keeps v_proj, down_proj of some layers and lm_head at 6 bits.")
    p.add_argument("-d", "--dequantize", action="store_true", help="Write float weights from a quantized model.")
    p.add_argument("--upload-repo", type=_cli.hub_repo, default=None, help="Also upload the result to this Hub repo (needs a login).")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --hf-path.")
    p.add_argument("--force", action="store_true", help="Replace --mlx-path if it exists (only once the new one is complete).")
    _cli.add_trust_remote_code(p)
    return p


def command(argv=None) -> None:
    args = build_parser().parse_args(argv)
    del args.trust_remote_code
    convert(**vars(args))
    print(f"[INFO] Done: {args.mlx_path}")


def main(argv=None) -> None:
    _cli.run(command, argv)
