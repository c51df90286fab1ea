"""HF transformers' ViTMAE (`ViTMAEForPreTraining`, `ViTMAEModel`) <-> this package's MAE: the
`config.json` fields and the state-dict keys, both ways. No file I/O here (`checkpoint` reads HF
folders, `export` writes them) and no import of transformers: the mapping is plain key renaming.

Key layouts read (`from_hf_state_dict`):
- the Hub's transformers-4 files: `vit.embeddings.*`, `vit.encoder.layer.N.attention.attention.query`,
  `...attention.output.dense`, `...intermediate.dense`, `...output.dense`, `vit.layernorm`,
  `decoder.decoder_layers.N...` with the same layer names;
- what transformers 5 writes (`save_pretrained` renames back to the names above, except the decoder
  layers, which come out as `decoder.decoder_encoder.layer.N...`);
- transformers 5's module names (`vit.layers.N.attention.q_proj`, `...o_proj`, `mlp.fc1`, `mlp.fc2`);
- `ViTMAEModel` files: the same without the `vit.` prefix and without the decoder.
Written (`to_hf_state_dict`): the transformers-4 names, which every version of transformers loads.
HF keeps query, key and value apart; our timm `Block` has one `attn.qkv` linear: [q; k; v] stacked.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping

import torch
import torch.nn as nn

from .checkpoint import CheckpointMismatchError

log = logging.getLogger("umae.checkpoint")

MODEL_TYPE = "vit_mae"
PRETRAINING, ENCODER = "ViTMAEForPreTraining", "ViTMAEModel"
CONFIG_KEY = "hf_config"  # where `checkpoint` keeps an HF folder's config.json beside the converted weights

_TOP = {  # HF name (after the optional `vit.` prefix) -> ours
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_DECODER_TOP = {f"decoder.{k}": k for k in (
    "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed", "decoder_norm.weight",
    "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias")}
_LAYER = {  # a layer's HF names (transformers 4, then 5) -> ours; q / k / v are stacked into attn.qkv
    "attention.attention.query": "q", "attention.q_proj": "q",
    "attention.attention.key": "k", "attention.k_proj": "k",
    "attention.attention.value": "v", "attention.v_proj": "v",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1", "layernorm_after": "norm2",
}
_TO_HF_LAYER = {"attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
                "norm1": "layernorm_before", "norm2": "layernorm_after"}
_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_ENCODER_LAYER = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)")  # after the prefix
_DECODER_LAYER = re.compile(r"decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)")


def is_hf_config(config: Any) -> bool:
    """Whether a loaded `config.json` is a ViTMAE one."""
    return isinstance(config, Mapping) and config.get("model_type") == MODEL_TYPE


def from_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ViTMAE state dict (any layout above) with this package's keys (`MaskedAutoencoderViT`'s;
    encoder only for a `ViTMAEModel`). Keys it cannot place, and layers without all of query, key
    and value, raise `CheckpointMismatchError` naming them."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        bare = key.removeprefix("vit.")
        if bare in _TOP:
            out[_TOP[bare]] = value
            continue
        if key in _DECODER_TOP:
            out[_DECODER_TOP[key]] = value
            continue
        m = _DECODER_LAYER.fullmatch(key)
        blocks = "decoder_blocks" if m else "blocks"
        m = m or _ENCODER_LAYER.fullmatch(bare)
        name = _LAYER.get(m[2]) if m else None
        if name is None:
            unknown.append(key)
        elif name in ("q", "k", "v"):
            qkv.setdefault((f"{blocks}.{m[1]}.attn.qkv", m[3]), {})[name] = value
        else:
            out[f"{blocks}.{m[1]}.{name}.{m[3]}"] = value
    if unknown:
        raise CheckpointMismatchError(f"not a ViTMAE state dict: cannot place {', '.join(unknown[:4])}"
                                      f"{f' (+{len(unknown) - 4} more)' if len(unknown) > 4 else ''}")
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            missing = "/".join(p for p in "qkv" if p not in parts)
            raise CheckpointMismatchError(f"ViTMAE layer {prefix}: no {kind} for {missing} (qkv_bias false?)")
        out[f"{prefix}.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def to_hf_state_dict(state: Mapping[str, torch.Tensor], decoder: bool = True) -> dict[str, torch.Tensor]:
    """This package's MAE state dict -> the transformers-4 keys of `ViTMAEForPreTraining` (`decoder`:
    keys under `vit.` and `decoder.`) or of `ViTMAEModel` (encoder keys only, no prefix). Keys with no
    HF counterpart raise `CheckpointMismatchError`."""
    prefix = "vit." if decoder else ""
    top = {v: prefix + k for k, v in _TOP.items()}
    if decoder:
        top.update({v: k for k, v in _DECODER_TOP.items()})
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in top:
            out[top[key]] = value.contiguous()
            continue
        m = re.fullmatch(r"(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None or (m[1] == "decoder_blocks" and not decoder):
            unknown.append(key)
            continue
        layer = f"{prefix}encoder.layer.{m[2]}" if m[1] == "blocks" else f"decoder.decoder_layers.{m[2]}"
        if m[3] == "attn.qkv":
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{layer}.{name}.{m[4]}"] = part.contiguous()
        elif m[3] in _TO_HF_LAYER:
            out[f"{layer}.{_TO_HF_LAYER[m[3]]}.{m[4]}"] = value.contiguous()
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointMismatchError(f"no ViTMAE counterpart for {', '.join(unknown[:4])}"
                                      f"{f' (+{len(unknown) - 4} more)' if len(unknown) > 4 else ''}")
    return out


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def saved_args(config: Mapping[str, Any]) -> dict[str, Any]:
    """What `checkpoint.infer_model_args` needs beside the weights of an HF folder: the heads (no
    weight's shape tells them) and the loss settings."""
    args = {"num_heads": config.get("num_attention_heads", 12), "norm_pix_loss": bool(config.get("norm_pix_loss", False)),
            "mask_ratio": float(config.get("mask_ratio", 0.75))}
    if "decoder_num_attention_heads" in config:
        args["decoder_num_heads"] = config["decoder_num_attention_heads"]
    return args


def check_supported(config: Mapping[str, Any]) -> None:
    """Raise `CheckpointMismatchError` naming a `config.json` field no model of ours can take: our
    ViT blocks (timm's `Block`) always have a query / key / value bias and exact GELU."""
    wrong = []
    if config.get("qkv_bias", True) is not True:
        wrong.append(f"qkv_bias {config.get('qkv_bias')!r} (ours: true)")
    if config.get("hidden_act", "gelu") != "gelu":
        wrong.append(f"hidden_act {config.get('hidden_act')!r} (ours: 'gelu', exact)")
    if wrong:
        raise CheckpointMismatchError(f"the HF config has no counterpart here: {'; '.join(wrong)}")


def _activation(block: nn.Module) -> str:
    act = block.mlp.act
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    return type(act).__name__


def check_config(model: nn.Module, config: Mapping[str, Any], decoder: bool) -> None:
    """Raise `CheckpointMismatchError` naming every `config.json` field that contradicts `model`: patch
    size, channels, widths, depths, heads, MLP widths, `qkv_bias`, `hidden_act` (the decoder's only
    with `decoder`: when the weights hold a decoder and the model has one). A `layer_norm_eps` other
    than the model's only warns: the Hub's MAE configs say 1e-12, but their weights were trained
    with the reference's 1e-6, which our models use."""
    blocks = model.blocks
    ours: dict[str, Any] = {"patch_size": tuple(model.patch_embed.patch_size),
                            "num_channels": model.patch_embed.proj.in_channels,
                            "hidden_size": model.patch_embed.proj.out_channels, "num_hidden_layers": len(blocks)}
    if len(blocks):
        ours.update(num_attention_heads=blocks[0].attn.num_heads, intermediate_size=blocks[0].mlp.fc1.out_features,
                    qkv_bias=blocks[0].attn.qkv.bias is not None, hidden_act=_activation(blocks[0]))
    dec = getattr(model, "decoder_blocks", None)
    if decoder and dec is not None:
        ours.update(decoder_hidden_size=model.decoder_embed.out_features, decoder_num_hidden_layers=len(dec))
        if len(dec):
            ours.update(decoder_num_attention_heads=dec[0].attn.num_heads,
                        decoder_intermediate_size=dec[0].mlp.fc1.out_features)
    hf_defaults = {"qkv_bias": True, "hidden_act": "gelu", "num_channels": 3}  # ViTMAEConfig's, for fields left out
    wrong = []
    for field, value in ours.items():
        theirs = config.get(field, hf_defaults.get(field))
        if field == "patch_size" and theirs is not None:
            theirs = _pair(theirs)
        if theirs is not None and theirs != value:
            wrong.append(f"{field} {theirs!r} vs model {value!r}")
    if wrong:
        raise CheckpointMismatchError(f"the HF config does not fit the model: {'; '.join(wrong)}")
    eps = config.get("layer_norm_eps")
    norm = blocks[0].norm1 if len(blocks) else None
    if eps is not None and isinstance(norm, nn.LayerNorm) and not math.isclose(eps, norm.eps, rel_tol=1e-9):
        log.warning("the HF config's layer_norm_eps %g differs from the model's %g: loaded anyway (the Hub's MAE "
                    "configs say 1e-12; their weights were trained with 1e-6)", eps, norm.eps)


def config_from_model(model: nn.Module, *, mask_ratio: float = 0.75) -> dict[str, Any]:
    """The `config.json` of the ViTMAE equal to `model`: `ViTMAEForPreTraining` for a model with the
    MAE decoder, else `ViTMAEModel` (the encoder); every field read off the built model (the
    LayerNorm eps too: 1e-6 for ours), `mask_ratio` the run's (the model takes it per call)."""
    blocks = model.blocks
    width = int(model.patch_embed.proj.out_channels)
    config: dict[str, Any] = {
        "architectures": [ENCODER], "model_type": MODEL_TYPE,
        "image_size": _square(model.patch_embed.img_size, "img_size"),
        "patch_size": _square(model.patch_embed.patch_size, "patch_size"),
        "num_channels": int(model.patch_embed.proj.in_channels), "hidden_size": width,
        "num_hidden_layers": len(blocks), "num_attention_heads": int(blocks[0].attn.num_heads),
        "intermediate_size": int(blocks[0].mlp.fc1.out_features), "hidden_act": _activation(blocks[0]),
        "qkv_bias": blocks[0].attn.qkv.bias is not None, "layer_norm_eps": float(blocks[0].norm1.eps),
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "mask_ratio": float(mask_ratio), "norm_pix_loss": bool(getattr(model, "norm_pix_loss", False)),
    }
    dec = getattr(model, "decoder_blocks", None)
    if dec is not None:
        config.update(architectures=[PRETRAINING], decoder_hidden_size=int(model.decoder_embed.out_features),
                      decoder_num_hidden_layers=len(dec), decoder_num_attention_heads=int(dec[0].attn.num_heads),
                      decoder_intermediate_size=int(dec[0].mlp.fc1.out_features))
    return config


def _square(value: Any, what: str) -> int:
    h, w = _pair(value)
    if h != w:
        raise CheckpointMismatchError(f"{what} {tuple(value)} is not square: ViTMAEConfig takes one {what}")
    return h
