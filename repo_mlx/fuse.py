"""Fuse adapters into a RePo model: ``python -m repo_mlx.fuse --model M --adapter-path A``.

The output is a standalone MLX folder like ``repo_mlx.convert`` writes, or with
``--export-hf`` the official Hugging Face format."""

import argparse
import json
from pathlib import Path
from typing import Optional

from mlx.utils import tree_unflatten

from . import _cli
from .files import atomic_folder
from .export_hf import export_hf
from .errors import LoadError
from .loader import dequantized, get_model_path, load, save_standalone, upload
from .adapters import fuse_layer


def fuse(
    model: Optional[str],
    adapter_path: str = "adapters",
    save_path: str = "fused_model",
    de_quantize: bool = False,
    export_hf_format: bool = False,
    force: bool = False,
    upload_repo: Optional[str] = None,
) -> Path:
    dst = Path(save_path)
    if dst.exists() and not force:  # fail before any compute
        raise LoadError(f"{dst} already exists; pass --force to replace it.")
    config_file = Path(adapter_path, "adapter_config.json")
    if not config_file.exists():
        raise LoadError(f"{adapter_path} has no adapter_config.json; is it an adapter folder?")
    if model is None:  # the base the adapters were trained on, as lora recorded it
        model = json.loads(config_file.read_text()).get("model")
        if not isinstance(model, str):
            raise LoadError(f"{config_file} names no base model; pass --model.")
    src = get_model_path(model)
    print(f"[INFO] Loading {src} with adapters {adapter_path}")
    net, tokenizer, config = load(str(src), adapter_path=adapter_path, return_config=True)
    # The HF format has no quantized layers, so exporting always dequantizes.
    de_quantize = de_quantize or export_hf_format
    fused = [(n, fuse_layer(m, de_quantize)) for n, m in net.named_modules() if hasattr(m, "fuse")]
    net.update_modules(tree_unflatten(fused))
    if de_quantize:
        net = dequantized(net, config)
    with atomic_folder(dst, force) as tmp:
        print(f"[INFO] Saving to {dst}" + (" (Hugging Face format)" if export_hf_format else ""))
        if export_hf_format:
            export_hf(tmp, net, tokenizer, config, src)
        else:
            save_standalone(tmp, src, net, tokenizer, config, donate_model=False)
    if upload_repo is not None:
        upload(dst, upload_repo)
    return dst


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m repo_mlx.fuse",
        description="Fuse LoRA/DoRA adapters (or full fine-tuned weights) from "
        "repo_mlx.lora into the base model and save a standalone model.",
    )
    p.add_argument("--model", help="The base model the adapters were trained on: folder or Hub id (default: the one adapter_config.json names).")
    p.add_argument("--adapter-path", type=_cli.adapter_dir, default="adapters", help="Folder with adapter_config.json and adapters.safetensors (default: adapters).")
    p.add_argument("--save-path", type=_cli.new_folder, default="fused_model", help="Output folder (default: fused_model); an existing one is replaced with --force, if repo_mlx wrote it.")
    p.add_argument("--de-quantize", "--dequantize", dest="de_quantize", action="store_true", help="Write float weights even if the base model is quantized (otherwise fused layers are re-quantized).")
    p.add_argument("--export-hf", dest="export_hf_format", action="store_true", help="Write the official Hugging Face format (float weights, HF config.json, tokenizer) instead of the MLX format; it loads in the official PyTorch code.")
    p.add_argument("--upload-repo", type=_cli.hub_repo, help="Also upload the result to this Hub repo (needs a login).")
    p.add_argument("--export-gguf", action="store_true", help="mlx-lm's GGUF export; refused: no GGUF runtime (llama.cpp, Ollama) computes RePo's learned positions, so the file would run as plain OLMo-2. Use --export-hf.")
    p.add_argument("--gguf-path", default="ggml-model-f16.gguf", help="File name for --export-gguf (refused).")
    p.add_argument("--force", action="store_true", help="Replace --save-path if it exists (only once the new one is complete).")
    _cli.add_trust_remote_code(p)
    return p


def command(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.export_gguf:
        raise LoadError("--export-gguf is not supported: no GGUF runtime computes RePo's learned positions, so the file "
                        "would run as plain OLMo-2; --export-hf writes the official format.")
    del args.trust_remote_code, args.export_gguf, args.gguf_path
    fuse(**vars(args))
    print(f"[INFO] Done: {args.save_path}")


def main(argv=None) -> None:
    _cli.run(command, argv)


if __name__ == "__main__":
    main()
