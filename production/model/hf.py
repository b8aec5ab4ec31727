"""Hugging Face Llama-family checkpoints, read from a local directory (never downloaded): config.json and the
weights in safetensors, one file or shards listed by model.safetensors.index.json, loaded into this project's
GPT with the `llama` block family (RMSNorm, SwiGLU, a head tied or not, GQA, RoPE theta and Llama 3's frequency
rescaling).

Supported: LlamaForCausalLM with SiLU, no attention or MLP biases, head_dim = hidden_size / num_attention_heads,
and RoPE "default" or "llama3". Anything else is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from production.core.errors import UserError
from production.model.config import LLAMA3_ROPE_KEYS, ModelConfig
from production.model.gpt import GPT

SUPPORTED = ("LlamaForCausalLM",)
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
# our parameter names for a layer's Hugging Face names
LAYER_NAMES = {
    "input_layernorm.weight": "ln1.weight",
    "self_attn.q_proj.weight": "attn.q.weight",
    "self_attn.k_proj.weight": "attn.k.weight",
    "self_attn.v_proj.weight": "attn.v.weight",
    "self_attn.o_proj.weight": "attn.o.weight",
    "post_attention_layernorm.weight": "ln2.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists() and not (path / "best.pt").exists()


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise UserError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not valid JSON ({e})") from e


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(theta, Llama 3 rescaling or None) from either config layout (rope_theta + rope_scaling, or
    transformers 5's rope_parameters)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise UserError(f"RoPE type {kind!r} is not supported; supported: default, llama3")
    return theta, {k: params[k] for k in LLAMA3_ROPE_KEYS}


def model_config(hf: dict, block_size: int = 2048) -> ModelConfig:
    """The ModelConfig of a Hugging Face config dict; block_size caps the context used for training here."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in SUPPORTED:
        raise UserError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED)}")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    problems = [
        f"hidden_act {hf.get('hidden_act')!r} (silu only)" if hf.get("hidden_act", "silu") != "silu" else None,
        "attention biases" if hf.get("attention_bias") else None,
        "MLP biases" if hf.get("mlp_bias") else None,
        f"head_dim {head_dim} != hidden_size / heads" if head_dim * heads != hidden else None,
    ]
    if any(problems):
        raise UserError(f"{arch} with {', '.join(p for p in problems if p)} is not supported")
    theta, llama3 = _rope(hf)
    kv_heads = hf.get("num_key_value_heads") or heads
    return ModelConfig(
        attn_mode="gqa" if kv_heads < heads else "standard",
        d_model=hidden,
        n_layer=hf["num_hidden_layers"],
        n_head=heads,
        d_ff=hf["intermediate_size"],
        block_size=min(hf.get("max_position_embeddings", block_size), block_size),
        attn_dim=hidden,
        sem_dim=None,
        geo_dim=None,
        kv_heads=kv_heads,
        null_attn=False,
        tie_qk=False,
        rope=True,
        rope_base=theta,
        vocab_size=hf["vocab_size"],
        family="llama",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_llama3=llama3,
    )


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, from model.safetensors or the shards its index names."""
    if (path / INDEX).exists():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
        if missing:
            raise UserError(f"{path / INDEX} names shards that are missing: {', '.join(missing)}")
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(str(path / shard)))
        return state
    if (path / SINGLE).exists():
        return load_file(str(path / SINGLE))
    raise UserError(f"{path} has no weights: expected {SINGLE} or {INDEX} (safetensors only)")


def convert(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face names -> this project's GPT names."""
    out = {"wte.weight": state["model.embed_tokens.weight"], "ln_f.weight": state["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layer):
        for theirs, ours in LAYER_NAMES.items():
            out[f"blocks.{i}.{ours}"] = state[f"model.layers.{i}.{theirs}"]
    return out


def load_hf_llama(path: str | Path, device: str = "cpu", block_size: int = 2048) -> GPT:
    """A Llama-family directory as this project's GPT (fp32, eval mode, on `device`)."""
    path = Path(path)
    cfg = model_config(read_config(path), block_size)
    state = read_weights(path)
    try:
        converted = convert(state, cfg)
    except KeyError as e:
        raise UserError(f"{path}: the weights lack {e.args[0]} for a {cfg.n_layer}-layer Llama") from e
    model = GPT(cfg)
    model.load_state_dict({k: v.float() for k, v in converted.items()})
    return model.to(device).eval()
