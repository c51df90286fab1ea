"""Checkpoint I/O, used by every script: rebuild the model of any checkpoint (`load_model`), load any
MAE-family checkpoint into a given pre-training model or classifier (`load_pretrained`), export timm
weights, and write checkpoints atomically. The checkpoint format lives here: a model's constructor
arguments travel with its weights under "model_args" (`model_args`, `plain_args`), and files that
lack them are read off their shapes in one place (`infer_model_args`).

Accepted sources (a path or an already loaded dict): official MAE checkpoints (`{"model": ...}`),
their encoder-only pre-training files, visualisation files with the decoder, fine-tuned and
linear-probe classifiers (head `head` or `head.0` BatchNorm / `head.1` Linear), U-MAE reference
checkpoints (their online-probe `fc.*` / `fc_norm.*` are ignored), this project's checkpoints,
timm-format ViT weights (same key names; also `.safetensors` files and timm's local-dir folders),
and HF transformers `ViTMAEForPreTraining` / `ViTMAEModel` folders (`read_folder`, keys mapped by
`hf`). Every key is sorted into a group, each group has one rule, and the report says exactly what
was loaded, initialised fresh, resampled or ignored.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import pickle
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from . import registry
from .errors import UsageError, UserError, one_line
from .models_mae import ARCHS
from .models_umae import REG_ALIASES, REGS

log = logging.getLogger("umae.checkpoint")

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+|last)\.pth$")


def _group(key: str) -> str:
    """Which part of a ViT a state-dict key belongs to."""
    if key in ("cls_token", "pos_embed") or key.startswith(("patch_embed.", "blocks.")):
        return "encoder"
    if key == "mask_token" or key.startswith("decoder"):
        return "decoder"
    for prefix in ("norm", "fc_norm", "head", "fc"):
        if key.startswith(prefix + "."):
            return prefix
    return "unknown"


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def short(keys: list[str]) -> str:
            groups = sorted({k.split(".")[0] for k in keys})
            return ", ".join(groups) if groups else "none"

        return (
            f"loaded {len(self.loaded)} tensors; initialised fresh: {short(self.fresh)}; "
            f"ignored from the checkpoint: {short(self.ignored)}; resampled: {short(self.resampled)}"
        )


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint's encoder does not fit the model's architecture."""


def torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """`torch.load` with `weights_only=True`; `argparse.Namespace` (the `args` of upstream
    checkpoints) is allowed as a safe global. `mmap` reads tensors lazily (zip-format files; a
    legacy-format file, which cannot be mapped, is read whole). A folder is read by `read_folder`
    (timm and HF transformers layouts), a `.safetensors` file as its state dict.

    A file that cannot be loaded raises `UserError` naming the path and the cause: missing or
    unreadable, empty, a text file, not a checkpoint, truncated or corrupt, or refused as unsafe (a
    pickle that asks for anything beyond tensors, plain containers and `argparse.Namespace` is
    refused by the weights-only unpickler before any of it runs)."""
    if os.path.isdir(path):
        return read_folder(path, map_location)
    if os.fspath(path).endswith(".safetensors"):
        return _safetensors_load(path, map_location)
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError as err:
        raise UserError(f"{path}: cannot read the checkpoint: {err.strerror or err}") from err
    if mmap and not head.startswith(_ZIP_MAGIC):
        mmap = False  # torch.load would refuse: only zip-format files can be memory-mapped
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except OSError as err:
        raise UserError(f"{path}: cannot read the checkpoint: {err.strerror or err}") from err
    except Exception as err:  # what torch.load raises for a bad file varies: EOFError, KeyError, ...
        raise UserError(f"{path}: {_load_failure(path, head, err)}") from err


_HEAD_BYTES = 512
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format (and torch.load's test for it)
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")


def _load_failure(path: str | os.PathLike, head: bytes, err: Exception) -> str:
    """Why `torch.load` failed on the file `path`, which starts with `head`, in words."""
    text = str(err)
    unsafe = _unsafe_request(text, _tail(path)) if isinstance(err, pickle.UnpicklingError) else None
    if unsafe is not None:
        return (f"refused as unsafe: it asks to load {unsafe}, which a weights-only load does not allow; nothing "
                f"in the file was run (if you trust its source, torch.load(weights_only=False) reads it)")
    if not head:
        return "empty file (0 bytes), not a checkpoint: an interrupted save or copy?"
    if head.startswith(_ZIP_MAGIC) or _ZIP_MAGIC.startswith(head):
        return f"truncated or corrupt checkpoint: an interrupted save or copy? ({_reason(err)})"
    if _looks_like_text(head):
        return "a text file, not a PyTorch checkpoint"
    if head.startswith(b"\x80"):  # a pickle: torch.save's legacy format, or a plain pickle
        return f"not a PyTorch checkpoint, or a truncated or corrupt one in the legacy format ({_reason(err)})"
    return "not a PyTorch checkpoint (neither torch.save's zip format nor its legacy pickle format)"


def _reason(err: Exception) -> str:
    """The line of a `torch.load` error that says what went wrong, without torch's advice around it."""
    text = str(err)
    match = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    line = match.group(1) if match else one_line(text).split(". ")[0]
    return f"{type(err).__name__}: {line.strip()}" if line.strip() else type(err).__name__


def _unsafe_request(text: str, tail: bytes) -> str | None:
    """What a weights-only refusal says the pickle asked for (a global, a call, an object), or None
    when the refusal is about malformed data instead: a name that is no Python name, or one cut
    short by the end of the file (`tail`: its last bytes), as in a truncated legacy-format file."""
    match = re.search(r"GLOBAL (\S+)", text)
    if match:
        name = match.group(1)
        # An unterminated last line is where a GLOBAL's name was cut short (the unpickler drops the
        # last byte of a line, taking it for the newline).
        cut = tail.rsplit(b"\n", 1)[-1]
        if len(cut) > 1 and name.endswith(cut[:-1].decode("utf-8", "replace")):
            return None
        return name if _DOTTED_NAME.fullmatch(name) or name.isidentifier() else None
    for pattern in (r"unrecognized function (.+?)(?: which belongs to|$)", r"allowlisted via `add_safe_globals`,? but got (.+)$"):
        match = re.search(pattern, text, re.M)
        if match:
            return match.group(1).strip()
    return None


def _tail(path: str | os.PathLike, size: int = 256) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            return f.read(size)
    except (OSError, TypeError):
        return b""


def _looks_like_text(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a character cut at the end of the sample
            return False
        decoded = head[:err.start].decode("utf-8")
    return bool(decoded) and all(c.isprintable() or c in "\t\n\r\f\v" for c in decoded)


def _safetensors_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(map_location))
    except FileNotFoundError as err:
        raise UserError(f"{path}: cannot read the checkpoint: no such file") from err
    except (OSError, SafetensorError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({type(err).__name__}: {first_line(err)})") from err


# A folder's weights, in the order timm's local-dir loader and transformers look for them (an index
# lists the shards of a sharded save).
FOLDER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_folder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint folder as a checkpoint dict: `config.json` beside `model.safetensors` (or its
    shards) or `pytorch_model.bin`, in one of two layouts.

    - HF transformers `ViTMAEForPreTraining` / `ViTMAEModel` (`model_type` "vit_mae"): the weights
      under this package's keys (`hf.from_hf_state_dict`), a "model_args" record read off them with
      the config's heads, the config's heads and loss settings as "args", the config itself under
      "hf_config" (`load_pretrained` / `load_model` check the model against it).
    - timm's local-dir layout (`architecture`, `model_args`, `pretrained_cfg`; `export --to timm`
      writes it): the weights (timm's ViT keys are ours), and `model_args`' encoder sizes
      (`embed_dim`, `depth`, `num_heads`) as "args", as `main_pretrain.py` records them.
    Anything else raises `UserError` naming the folder and what is missing."""
    from . import hf

    folder = Path(path)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder}: cannot read the checkpoint: {os.strerror(errno.EISDIR)}, and no timm or HF "
                        "transformers checkpoint folder (no config.json)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{config_path}: cannot read it as JSON ({type(err).__name__}: {first_line(err)})") from err
    if hf.is_hf_config(config):
        try:
            hf.check_supported(config)
            state = hf.from_hf_state_dict(_folder_weights(folder, map_location))
            args = hf.saved_args(config)
            record = infer_model_args(state, args)
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(f"{folder}: {err}") from None
        return {"model": state, "args": args, MODEL_ARGS_KEY: record, hf.CONFIG_KEY: config}
    if isinstance(config, Mapping) and isinstance(config.get("architecture"), str):
        model_args = config.get("model_args") if isinstance(config.get("model_args"), Mapping) else {}
        return {"model": _folder_weights(folder, map_location),
                "args": {k: model_args[k] for k in ("embed_dim", "depth", "num_heads") if k in model_args}}
    kind = config.get("model_type") if isinstance(config, Mapping) else None
    raise UserError(f"{config_path}: neither timm's (no 'architecture') nor an HF transformers ViTMAE config "
                    f"(model_type {kind!r}, not {hf.MODEL_TYPE!r})")


def _folder_weights(folder: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    name = next((n for n in FOLDER_WEIGHTS if (folder / n).is_file()), None)
    if name is None:
        raise UserError(f"{folder}: no weights ({', '.join(FOLDER_WEIGHTS)}) beside config.json")
    if not name.endswith(".index.json"):
        return _weights_file(folder / name, map_location)
    try:
        shards = sorted(set(json.loads((folder / name).read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{folder / name}: not a shard index ({type(err).__name__}: {first_line(err)})") from err
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(_weights_file(folder / shard, map_location))
    return state


def _weights_file(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return _safetensors_load(path, map_location)
    return extract_state_dict(torch_load(path, map_location))


def read_checkpoint(path: str | os.PathLike, flag: str, mmap: bool = False) -> Any:
    """`torch_load` for a file named on the command line: a failure names the flag too
    (`--finetune PATH: a text file, ...`). With `mmap` tensors are read lazily where the format allows."""
    try:
        return torch_load(path, mmap=mmap)
    except UserError as err:
        raise UserError(f"{flag} {err}") from err


def first_line(err: BaseException) -> str:
    """The first line of an error's message (torch's `load_state_dict` errors run to many lines)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def extract_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights held by a checkpoint path or dict (`model`, `state_dict`, `module` or the
    dict itself), with DDP / compile prefixes removed."""
    obj = torch_load(source) if isinstance(source, (str, os.PathLike)) else source
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatchError(
            f"no state dict of tensors found in checkpoint {source if not isinstance(source, Mapping) else '<dict>'}")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def _is_fixed_table(model: nn.Module, key: str) -> bool:
    params = dict(model.named_parameters())
    return key in params and not params[key].requires_grad


def _grid(num_tokens: int, prefix: int = 1) -> list[int]:
    side = math.isqrt(num_tokens - prefix)
    if side * side != num_tokens - prefix:
        raise CheckpointMismatchError(f"position embedding of {num_tokens} tokens is not a square grid")
    return [side, side]


def load_pretrained(
    model: nn.Module, source: str | os.PathLike | Mapping[str, Any], origin: str | None = None
) -> LoadReport:
    """`_load_pretrained`, with `origin` (e.g. "--finetune PATH") in front of a mismatch message,
    so that the one-line error names the flag and the file."""
    try:
        return _load_pretrained(model, source)
    except CheckpointMismatchError as err:
        if origin is None:
            raise
        raise CheckpointMismatchError(f"{origin}: {err}") from None


def _load_pretrained(model: nn.Module, source: str | os.PathLike | Mapping[str, Any]) -> LoadReport:
    """Load a checkpoint's weights into `model` (a pre-training model or a classifier).

    Rules by group: the encoder (`cls_token`, `pos_embed`, `patch_embed`, `blocks`) must match in
    keys and shapes, else `CheckpointMismatchError` names the offending keys; a position embedding
    of another grid is resampled for a classifier (timm's `resample_abs_pos_embed`) and, for a
    pre-training model's fixed sin-cos table, regenerated (the model's own table is kept); `norm`
    and the decoder load when present and of the right shape, else stay freshly initialised;
    `fc_norm` and `head` load only from a real classifier (one with `head.*`) whose head has the
    model's structure and shapes; U-MAE online-probe keys (`fc.*`) are ignored. An HF transformers
    source (a folder read by `read_folder`) is first checked against the model field by field
    (`hf.check_config`: heads, widths, depths, ... raise; `layer_norm_eps` warns).
    """
    obj = torch_load(source) if isinstance(source, (str, os.PathLike)) else source
    try:
        src = extract_state_dict(obj)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(str(err).replace("<dict>", os.fspath(source))
                                      if isinstance(source, (str, os.PathLike)) else str(err)) from None
    _check_hf_config(model, obj, src)
    target = model.state_dict()
    src_is_classifier = any(_group(k) == "head" for k in src)
    report = LoadReport()
    mismatched, unexpected = [], []
    new_state = dict(target)

    src_head = {k for k in src if _group(k) == "head"}
    tgt_head = {k for k in target if _group(k) == "head"}
    head_fits = src_head == tgt_head and all(src[k].shape == target[k].shape for k in tgt_head)

    for key, value in src.items():
        group = _group(key)
        if key not in target:
            if group in ("encoder", "unknown"):
                unexpected.append(f"{key} {tuple(value.shape)}")
            else:
                report.ignored.append(key)
            continue
        if group == "head" and not head_fits:
            report.ignored.append(key)
            continue
        if group == "fc_norm" and not src_is_classifier:
            report.ignored.append(key)
            continue
        if value.shape != target[key].shape:
            if key.endswith("pos_embed") and _is_fixed_table(model, key):
                report.ignored.append(key)  # the model's own sin-cos table is already the right one
                continue
            if key == "pos_embed":
                new_grid = list(model.patch_embed.grid_size)
                value = resample_abs_pos_embed(value, new_grid, _grid(value.shape[1]), num_prefix_tokens=1)
                report.resampled.append(key)
            elif group == "decoder":
                report.ignored.append(key)
                log.warning("decoder key %s has shape %s in the checkpoint but %s in the model: initialised fresh",
                            key, tuple(value.shape), tuple(target[key].shape))
                continue
            else:
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}")
                continue
        new_state[key] = value.to(dtype=target[key].dtype)
        report.loaded.append(key)

    missing_encoder = [k for k in target if _group(k) == "encoder" and k not in src]
    if mismatched or unexpected or missing_encoder:
        lines = ["checkpoint does not fit the model's architecture:"]
        lines += [f"  shape mismatch  {m}" for m in mismatched]
        lines += [f"  unexpected key  {u}" for u in unexpected[:20]]
        lines += [f"  missing key     {k} {tuple(target[k].shape)}" for k in missing_encoder[:20]]
        raise CheckpointMismatchError("\n".join(lines))

    loaded = set(report.loaded)
    report.fresh = [k for k in target if k not in loaded]
    model.load_state_dict(new_state, strict=True)
    log.info("checkpoint: %s", report)
    return report


def _check_hf_config(model: nn.Module, checkpoint: Any, state: Mapping[str, torch.Tensor]) -> None:
    """`hf.check_config` for a checkpoint read from an HF transformers folder; nothing for others."""
    from . import hf

    config = checkpoint.get(hf.CONFIG_KEY) if isinstance(checkpoint, Mapping) else None
    if config is not None:
        hf.check_config(model, config, decoder=any(_group(k) == "decoder" for k in state))


def export_timm_state_dict(
    source: str | os.PathLike | Mapping[str, Any], global_pool: bool, num_classes: int = 1000
) -> dict[str, torch.Tensor]:
    """An encoder as a timm ViT state dict, loadable with `strict=True` by
    `timm.create_model("vit_base_patch16_224", global_pool="avg" if global_pool else "token",
    num_classes=num_classes)` (and the other sizes). `fc_norm` and the head come from the source
    when it is a classifier with such a head, else they are freshly initialised (untrained)."""
    from .models_vit import VisionTransformerClassifier

    src = extract_state_dict(source)
    kw = infer_model_args(src)["kwargs"]  # the encoder's shapes; num_heads changes no weight's shape
    model = VisionTransformerClassifier(
        global_pool=global_pool, img_size=kw["img_size"], patch_size=kw["patch_size"], embed_dim=kw["embed_dim"],
        depth=kw["depth"], num_heads=1, num_classes=num_classes, qkv_bias=True, mlp_ratio=kw["mlp_ratio"],
    )
    load_pretrained(model, src)
    return model.state_dict()


# ---------------------------------------------------------------------------------------------
# self-describing checkpoints: the model's constructor arguments travel with its weights
#
# A checkpoint carries `"model_args": {"name": <registry factory name>, "kwargs": {...}}` (plus
# `"head": "batchnorm"` for a linear probe) and `"args": plain_args(args)`: plain values only, so
# `torch.load(path, weights_only=True)` reads it and `load_model` rebuilds the exact model from the
# file alone. Files without the record (official MAE files, older files of ours, fine-tuned and
# linear-probe classifiers) go through `infer_model_args`, the one place that reads an architecture
# off tensor shapes.

MODEL_ARGS_KEY = "model_args"
PROBE_HEADS = ("batchnorm",)  # head.0 BatchNorm1d (no affine, eps 1e-6) + head.1 Linear, as linear probing builds it


def model_args(name: str, kwargs: Mapping[str, Any], head: str | None = None) -> dict[str, Any]:
    """The record a checkpoint carries under "model_args": `registry.create_model(name, **kwargs)`
    builds its model (`head="batchnorm"`: then with `linear_probe_head`). Every keyword value must
    survive a JSON round trip unchanged (tuples become lists), else ValueError naming the key."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model_args: the model name must be a non-empty string, got {name!r}")
    if head is not None and head not in PROBE_HEADS:
        raise ValueError(f"model_args {name}: unknown head {head!r}; known: {', '.join(PROBE_HEADS)}")
    plain: dict[str, Any] = {}
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise ValueError(f"model_args {name}: keyword {key!r} is not a string")
        try:
            plain[key] = json.loads(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError):
            plain[key] = _NOT_JSON
        if plain[key] != _lists(value):
            raise ValueError(f"model_args {name}: {key}={value!r} ({type(value).__name__}) is not a JSON value")
    record: dict[str, Any] = {"name": name, "kwargs": plain}
    if head is not None:
        record["head"] = head
    return record


_NOT_JSON = object()


def _lists(value: Any) -> Any:
    """`value` with tuples as lists (what JSON gives back), for comparison."""
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def plain_args(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """A run's arguments as a plain, JSON-able dict, to store under "args" instead of the
    Namespace: subclasses of bool / int / float / str (`cli.DefaultMaskRatio`) become the plain
    type, tuples and sets lists, mappings dicts with string keys, anything else (`Path`,
    `torch.device`, ...) its string."""
    items = vars(args) if isinstance(args, argparse.Namespace) else args
    return {str(k): _plain(v) for k, v in items.items()}


def _plain(value: Any) -> Any:
    if value is None:
        return None
    for kind in (bool, int, float, str):  # bool first: it is an int
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=repr)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def stored_args(checkpoint: Any) -> dict[str, Any] | None:
    """The run arguments a loaded checkpoint holds under "args" (a Namespace in older files and
    upstream ones, a plain dict in new ones) as a dict; None when it has none."""
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, Mapping) else None


def linear_probe_head(linear: nn.Linear) -> nn.Sequential:
    """The reference linear probe's head: a BatchNorm without affine parameters before `linear`
    (state-dict keys `head.0.*`, `head.1.*`)."""
    return nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6), linear)


def build_model(record: Mapping[str, Any]) -> nn.Module:
    """The model a "model_args" record describes, freshly initialised, in training mode."""
    record = _checked_record(record)
    model = registry.create_model(record["name"], **record["kwargs"])
    if record.get("head") == "batchnorm":
        model.head = linear_probe_head(model.head)
    return model


def _checked_record(record: Any) -> dict[str, Any]:
    if not isinstance(record, Mapping) or not isinstance(record.get("kwargs", {}), Mapping):
        raise CheckpointMismatchError(f"malformed model_args {record!r}: expected {{'name': ..., 'kwargs': {{...}}}}")
    try:
        return model_args(record.get("name"), record.get("kwargs", {}), record.get("head"))
    except ValueError as err:
        raise CheckpointMismatchError(f"malformed {err}") from None


def checkpoint_model_args(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The "model_args" record of a loaded checkpoint: the stored one, else `infer_model_args` from
    its weights and stored args."""
    if isinstance(checkpoint, Mapping) and checkpoint.get(MODEL_ARGS_KEY) is not None:
        return _checked_record(checkpoint[MODEL_ARGS_KEY])
    return infer_model_args(extract_state_dict(checkpoint), stored_args(checkpoint))


def load_model(path_or_checkpoint: str | os.PathLike | Mapping[str, Any],
               map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the exact model of a checkpoint (a path or a loaded dict) from the file alone: from
    its "model_args" record, else from `infer_model_args`; weights loaded strictly. Returns the
    model in eval mode on `map_location`. Weights that do not fit the model are a one-line
    `CheckpointMismatchError` naming the keys; U-MAE reference online-probe keys (`fc.*`,
    `fc_norm.*` beside a decoder) are dropped first."""
    if isinstance(path_or_checkpoint, (str, os.PathLike)):
        try:
            return load_model(torch_load(path_or_checkpoint, map_location), map_location)
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(f"{path_or_checkpoint}: {err}") from None
    record = checkpoint_model_args(path_or_checkpoint)
    try:
        model = build_model(record)
    except (ValueError, TypeError, AssertionError) as err:  # unregistered name, unknown keyword, heads vs width
        raise CheckpointMismatchError(f"cannot build {record['name']}: {first_line(err)}") from None
    state = _without_probe_keys(extract_state_dict(path_or_checkpoint), model.state_dict())
    _check_hf_config(model, path_or_checkpoint, state)
    problems = _misfit(model.state_dict(), state)
    if problems:
        raise CheckpointMismatchError(f"the weights do not fit {record['name']}: {problems}")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def _without_probe_keys(state: Mapping[str, torch.Tensor], target: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """`state` less the U-MAE reference's online-probe keys (`fc.*`, `fc_norm.*` in a checkpoint
    with a decoder) that the model does not have."""
    with_decoder = any(_group(k) == "decoder" for k in state)
    dropped = [k for k in state if with_decoder and _group(k) in ("fc", "fc_norm") and k not in target]
    if dropped:
        log.info("ignoring the online-probe keys %s of a pre-training checkpoint", ", ".join(dropped))
    return {k: v for k, v in state.items() if k not in dropped}


def _misfit(target: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """What keeps `state` from a strict load into a model with state dict `target`, in one line
    ("" when it fits)."""
    def few(items: list[str]) -> str:
        return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")

    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
              for k in target if k in state and state[k].shape != target[k].shape]
    parts = [f"{label} {few(keys)}" for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                          ("shape (checkpoint vs model)", shapes)) if keys]
    return "; ".join(parts)


# Heads of the standard encoders by width (heads change no weight shape), for files that say nothing else.
_HEADS_BY_WIDTH = {cfg["embed_dim"]: cfg["num_heads"] for cfg in ARCHS.values()}


def infer_model_args(state_dict: Mapping[str, Any], saved_args: Mapping[str, Any] | argparse.Namespace | None = None,
                     *, guess_heads: bool = True) -> dict[str, Any]:
    """The "model_args" record of a checkpoint that has none, from its weights (`state_dict`: a
    state dict, or a checkpoint dict holding one) and the run arguments stored beside them
    (`saved_args`: a Namespace or dict, or None).

    The weights decide the family and every shape: a decoder (`decoder_embed.*`) is MAE, a one-layer
    `decoder_pred` without it SimMIM, a `head.*` a classifier (`fc_norm` present: `global_pool`;
    `head.0` BatchNorm + `head.1` Linear: a linear probe), neither an encoder-only export (built as
    a classifier without head, `global_pool` over the final norm: the pre-training models' mean-pooled
    features); image and patch size, channels, width, depth, MLP ratio, decoder width and depth, and
    the class count are read off the shapes. The arguments give what shapes do not say: the model
    name (`model`: a pre-training name maps to its `vit_*` for classifier weights, and to the `u*`
    model when `lambda_unif` > 0), `num_heads` / `decoder_num_heads` (else the named factory's),
    `norm_pix_loss`, `lambda_unif` and `unif_pool`. Without a usable name (none, unregistered, or
    not fitting the weights) a standard name of that family is used and the heads are guessed from
    the width (the standard ViT's, else width / 64; decoder 16 at 512, else width / 32), with a
    warning; with `guess_heads=False` a `CheckpointMismatchError` says the heads cannot be known
    instead. The record is checked against the weights on the meta device before it is returned."""
    state = extract_state_dict(state_dict)
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise CheckpointMismatchError(f"cannot infer the architecture: the weights have no {key!r}")
    saved = dict(vars(saved_args) if isinstance(saved_args, argparse.Namespace) else saved_args or {})
    kind = _weights_kind(state)
    name = _saved_name(kind, saved)
    if name is not None:
        try:
            return _inferred_record(kind, name, state, saved, guess_heads=False)
        except (ValueError, TypeError, AssertionError) as err:  # CheckpointMismatchError is a ValueError
            log.warning("the checkpoint's args name model %r, which does not fit its weights (%s): reading the "
                        "architecture from the shapes", saved.get("model"), first_line(err))
    return _inferred_record(kind, _standard_name(kind, state, saved), state, saved, guess_heads=True,
                            may_guess=guess_heads)


def _weights_kind(state: Mapping[str, torch.Tensor]) -> str:
    """"mae", "simmim", "classifier" or "encoder" (no decoder, no head), from the keys."""
    if "decoder_embed.weight" in state:
        return "mae"
    if "decoder_pred.weight" in state:
        return "simmim"
    return "classifier" if any(_group(k) == "head" for k in state) else "encoder"


def _uniformity(saved: Mapping[str, Any], named_u: bool) -> float:
    """The uniformity weight the run used: its `lambda_unif` (`lamb` in the U-MAE / M-MAE reference's
    args), else the default for its name (`registry.default_lambda`: 0.01 for `umae_*` / `usimmim_*`, else 0)."""
    value = saved.get("lambda_unif", saved.get("lamb"))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.01 * named_u


def _term(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The uniformity family's term in stored args (`reg`, `uniformity_mu`, `centering`, as our
    scripts and M-MAE's save them; the U-MAE reference's `spectral` / `entropy` mean `square`); {}
    (the constructor's `square`) for args without one."""
    reg = REG_ALIASES.get(saved.get("reg"), saved.get("reg"))
    if reg not in REGS:
        return {}
    term: dict[str, Any] = {"reg": reg}
    mu = saved.get("uniformity_mu")
    if isinstance(mu, (int, float)) and not isinstance(mu, bool) and mu > 0:
        term["uniformity_mu"] = float(mu)
    if isinstance(saved.get("centering"), bool):
        term["centering"] = saved["centering"]
    return term


def _saved_name(kind: str, saved: Mapping[str, Any]) -> str | None:
    """The registered factory the stored `model` names for weights of `kind`, or None."""
    name = saved.get("model")
    if not isinstance(name, str):
        return None
    try:
        parsed = registry.parse_model_name(name)
    except ValueError:
        return name if name in registry.list_models() else None  # a custom name: checked against the weights
    if kind in ("classifier", "encoder"):
        resolved = parsed.arch
    elif parsed.family != kind:
        return None
    else:
        resolved = registry.pretrain_name(kind, _uniformity(saved, parsed.uniformity) > 0, parsed.arch)
    if resolved not in registry.list_models():
        log.warning("the checkpoint's args name model %r, which is not registered here (%s): reading the "
                    "architecture from the shapes", name, resolved)
        return None
    return resolved


def _named_uniformity(name: str) -> bool:
    try:
        return registry.parse_model_name(name).uniformity
    except ValueError:
        return False


def _standard_name(kind: str, state: Mapping[str, torch.Tensor], saved: Mapping[str, Any]) -> str:
    """A standard factory of the weights' family: the encoder of the same width, patch and depth
    (else width, else base); every shape is passed explicitly anyway."""
    width, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
    depth = _depth(state, "blocks.")
    arch = next((a for a, c in ARCHS.items() if (c["embed_dim"], c["patch_size"], c["depth"]) == (width, patch, depth)),
                next((a for a, c in ARCHS.items() if c["embed_dim"] == width), "base_patch16"))
    if kind in ("classifier", "encoder"):
        return f"vit_{arch}"
    return registry.pretrain_name(kind, _uniformity(saved, False) > 0, f"vit_{arch}")


def _depth(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    return 1 + max((int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)), default=-1)


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _guessed_heads(width: int, saved: Any, table: Mapping[int, int], per_head: int, what: str,
                   may_guess: bool = True) -> int:
    if _positive_int(saved) and width % saved == 0:
        return saved
    if not may_guess:
        raise CheckpointMismatchError(f"{what} cannot be known: the checkpoint has no model_args and its args give "
                                      f"no {what} or model name (heads change no weight's shape; not guessed)")
    heads = table.get(width) or max(1, width // per_head)
    while width % heads:
        heads -= 1
    log.warning("%s=%d guessed from the width %d (heads change no weight shape)", what, heads, width)
    return heads


def _inferred_record(kind: str, name: str, state: Mapping[str, torch.Tensor], saved: Mapping[str, Any],
                     guess_heads: bool, may_guess: bool = True) -> dict[str, Any]:
    width = state["cls_token"].shape[-1]
    proj = state["patch_embed.proj.weight"]  # [D, C, p, p]
    patch = proj.shape[-1]
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = hidden / width
    if int(width * mlp_ratio) != hidden:  # Block builds int(width * mlp_ratio) hidden units
        mlp_ratio = math.nextafter(mlp_ratio, math.inf)
    kwargs: dict[str, Any] = dict(img_size=_grid(state["pos_embed"].shape[1])[0] * patch, patch_size=patch,
                                  in_chans=proj.shape[1], embed_dim=width, depth=_depth(state, "blocks."),
                                  num_heads=saved.get("num_heads"), mlp_ratio=mlp_ratio)
    head = None
    if kind == "mae":
        kwargs.update(decoder_embed_dim=state["decoder_embed.weight"].shape[0],
                      decoder_depth=_depth(state, "decoder_blocks."), decoder_num_heads=saved.get("decoder_num_heads"))
    if kind in ("mae", "simmim"):
        kwargs["norm_pix_loss"] = bool(saved.get("norm_pix_loss", False))
        if _named_uniformity(name):
            unif_pool = saved.get("unif_pool")
            kwargs.update(lambda_unif=_uniformity(saved, True), unif_pool=unif_pool if isinstance(unif_pool, str) else "mean")
            kwargs.update(_term(saved))
    else:
        linear = "head.1.weight" if "head.1.weight" in state else "head.weight"
        kwargs.update(num_classes=state[linear].shape[0] if linear in state else 0,
                      global_pool="fc_norm.weight" in state or kind == "encoder")
        if kind == "encoder":
            kwargs["fc_norm"] = False  # the final norm before the patch-token mean: pool_latent(..., "mean")
        head = "batchnorm" if linear == "head.1.weight" else None
    heads = [k for k in ("num_heads", "decoder_num_heads") if k in kwargs]
    if guess_heads:
        kwargs["num_heads"] = _guessed_heads(width, kwargs["num_heads"], _HEADS_BY_WIDTH, 64, "num_heads", may_guess)
        if kind == "mae":
            kwargs["decoder_num_heads"] = _guessed_heads(kwargs["decoder_embed_dim"], kwargs["decoder_num_heads"],
                                                         {512: 16}, 32, "decoder_num_heads", may_guess)
    with torch.device("meta"):  # no memory, no weights: the factory's defaults (heads) and the shapes
        model = build_model(model_args(name, {k: v for k, v in kwargs.items() if k not in heads or _positive_int(v)},
                                       head))
    kwargs["num_heads"] = model.blocks[0].attn.num_heads
    if kind == "mae":
        kwargs["decoder_num_heads"] = model.decoder_blocks[0].attn.num_heads
    problems = _misfit(model.state_dict(), _without_probe_keys(state, model.state_dict()))
    if problems:
        raise CheckpointMismatchError(f"the weights do not fit {name}: {problems}")
    return model_args(name, kwargs, head)


# ---------------------------------------------------------------------------------------------
# resuming: the flags against the checkpoint's model, then the training state


def at_parser_default(parser: argparse.ArgumentParser, args: argparse.Namespace, dest: str) -> bool:
    """Whether flag `dest` was left at its parser default: the default object itself, or a value of
    the same type that equals it (so `cli.DefaultMaskRatio`, the marker of an absent `--mask_ratio`,
    is told from a `--mask_ratio 0.75` given on the command line)."""
    default, value = parser.get_default(dest), getattr(args, dest, None)
    return value is default or (type(value) is type(default) and value == default)


def reconcile_resume_flags(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    resume: str | os.PathLike,
    architecture: Mapping[str, Any],
    losses: Mapping[str, Any] | None = None,
    *,
    same: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> None:
    """On `--resume`, the flags against the checkpoint's values (dest -> value; None: unknown, not
    compared). `architecture`: flags that change the state dict or the patch grid; `losses`: loss
    settings. A flag left at its parser default takes the checkpoint's value; an architecture flag
    given with another value is a `UsageError` naming the flag and both values (exit 2); a loss
    setting given with another value is kept, with a warning. `same`: dest -> equality for values
    that compare otherwise than with `==` (model names); `flags`: dest -> the flag's name, or
    (name when true, name when false) for a boolean pair such as `--global_pool` / `--cls_token`."""
    same, flags = same or {}, flags or {}
    for dest, theirs in {**architecture, **(losses or {})}.items():
        if theirs is None:
            continue
        ours = getattr(args, dest, None)
        if at_parser_default(parser, args, dest):
            if ours != theirs:
                log.info("--resume: %s %s from the checkpoint", dest, theirs)
            setattr(args, dest, theirs)
            continue
        if same.get(dest, lambda a, b: a == b)(ours, theirs):
            continue
        flag = flags.get(dest, f"--{dest}")
        if isinstance(flag, tuple):
            flag = f"{flag[0] if ours else flag[1]} ({dest} {ours})"
        else:
            flag = f"{flag} {ours}"
        if dest in architecture:
            raise UsageError(f"--resume {resume}: {flag} contradicts the checkpoint's {dest} {theirs}; "
                             "drop the flag to take the checkpoint's value, or start a new run")
        log.warning("--resume %s: %s differs from the checkpoint's %s %s; training goes on with the flag's value",
                    resume, flag, dest, theirs)


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    *,
    args: argparse.Namespace | Mapping[str, Any],
    model_args: Mapping[str, Any],
    scaler: torch.amp.GradScaler | None = None,
    device: torch.device | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An epoch's checkpoint, for every script: `model`, `optimizer`, `epoch`, `scaler` (None when
    fp16 scaling is off), `args` (`plain_args`), "model_args" (the record `model` was built from),
    with `device` `rng` (rank 0's random state, `runtime.get_rng_state`), and the script's `extra`
    keys. Plain values and tensors only: `torch.load(weights_only=True)` reads it."""
    from .runtime import get_rng_state

    state: dict[str, Any] = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": int(epoch),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "args": plain_args(args), MODEL_ARGS_KEY: _checked_record(model_args),
    }
    if device is not None:
        state["rng"] = get_rng_state(device)
    state.update(extra)
    return state


def restore_training_state(
    state: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    *,
    seed: int,
    origin: str = "--resume",
) -> int | None:
    """Restore what `training_state` saved (older files too: a Namespace `args`, no or a None
    `scaler`, no `rng`): the model always (strict); with `optimizer` also the optimizer, the fp16
    scaler when it is on and was saved, and the random state (`restore_rng`). Returns the epoch to
    start at (saved epoch + 1), or None when only the model was restored (no `optimizer`, or a
    file without one). A file that does not fit is a `UserError` naming `origin`."""
    try:
        model.load_state_dict(state["model"], strict=True)
        if optimizer is None or "optimizer" not in state or "epoch" not in state:
            return None
        optimizer.load_state_dict(state["optimizer"])
        epoch = int(state["epoch"])
        if scaler is not None and scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as err:
        raise UserError(f"{origin}: not a checkpoint of this run's model and optimizer "
                        f"({type(err).__name__}: {first_line(err)})") from err
    restore_rng(state.get("rng"), seed, epoch)
    return epoch + 1


def restore_rng(rng: Mapping[str, Any] | None, seed: int, epoch: int) -> None:
    """The random state after a resume from the end of `epoch`: one process continues the saved
    stream (`runtime.set_rng_state`); with several, only rank 0's state was saved, so every rank
    gets its own stream again, seeded from (`seed`, rank, epoch)."""
    from . import distributed
    from .runtime import set_rng_state

    if distributed.get_world_size() == 1:
        set_rng_state(rng)
    else:
        torch.manual_seed(seed + distributed.get_rank() + 100_003 * (epoch + 1))


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, read-only or missing folder...); the message
    names the file and the cause, and the previous file of that name is intact."""


class UnreadableCheckpointsError(UserError):
    """`--resume auto` found checkpoint files in the output folder, but none that can be read."""


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells it
    (`/proc/self/status`, Linux >= 4.7); else set and restored at once, under a lock."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _write_failure(err: BaseException) -> str | None:
    """Why a write failed, when the cause is the filesystem: the first `OSError` in the exception
    chain (`__cause__` / `__context__`: torch wraps the file's error in a `RuntimeError`), or a
    'No space left on device' in a message; None for anything else (a bug: re-raised as is)."""
    seen: set[int] = set()
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for e in chain:
        if isinstance(e, OSError):
            reason = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
            return reason if reason else type(e).__name__
    enospc = os.strerror(errno.ENOSPC)
    if any(enospc.lower() in str(e).lower() for e in chain):
        return enospc
    return None


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file in the same folder, fsync, then rename over `path`: a kill
    at any moment leaves either the old file or the new one, never a truncated file. The file gets
    the permissions the umask gives (as `open` would), not mkstemp's 0600. A filesystem failure
    (disk full, read-only folder...) is a `CheckpointWriteError` naming `path` and the cause; the
    temporary file is removed and the previous `path` left intact."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {_write_failure(err)}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        reason = _write_failure(err) if isinstance(err, Exception) and not isinstance(err, UserError) else None
        if reason is None:
            raise
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {reason}{kept}") from err
    with contextlib.suppress(OSError):  # the rename is done; a folder that cannot be synced loses nothing here
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def checkpoint_due(epoch: int, save_freq: int, epochs: int) -> bool:
    """Whether `checkpoint-{epoch}.pth` is written: every `save_freq` epochs and at the last one."""
    return epoch % save_freq == 0 or epoch + 1 == epochs


def save_checkpoint(output_dir: str | os.PathLike, state: Mapping[str, Any], epoch: int, save_freq: int,
                    last: bool) -> None:
    """An epoch's checkpoints, for every script: `checkpoint-last.pth` every epoch,
    `checkpoint-{epoch}.pth` every `save_freq` epochs and at the last one (`last`). Atomic writes:
    a kill leaves the previous file intact."""
    out = Path(output_dir)
    save_atomic(state, out / "checkpoint-last.pth")
    if epoch % save_freq == 0 or last:
        save_atomic(state, out / f"checkpoint-{epoch}.pth")


def restore_missing_checkpoint(
    output_dir: str | os.PathLike | None, state: Mapping[str, Any], save_freq: int, epochs: int, resume: str
) -> Path | None:
    """On resume: write `checkpoint-{epoch}.pth` of the resumed state when that epoch's numbered
    checkpoint is due (`checkpoint_due`) but missing (a kill during its write, after
    `checkpoint-last.pth` was written). Only for a resume from the output folder itself
    (`--resume auto`, or a file in it); returns the path written, or None."""
    if not output_dir or not isinstance(state, Mapping) or "model" not in state or "epoch" not in state:
        return None
    out = Path(output_dir)
    if resume != "auto":
        try:
            if Path(resume).resolve().parent != out.resolve():
                return None
        except (OSError, RuntimeError):
            return None
    epoch = int(state["epoch"])
    target = out / f"checkpoint-{epoch}.pth"
    if not checkpoint_due(epoch, save_freq, epochs) or target.exists():
        return None
    log.warning("%s is missing (its write was killed?): writing it from the resumed state", target)
    save_atomic(dict(state), target)
    return target


def _scan_checkpoints(output_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, Exception]]]:
    """(the newest readable checkpoint or None, the unreadable checkpoint files with their errors)."""
    best, best_epoch = None, -1
    unreadable: list[tuple[Path, Exception]] = []
    for path in sorted(Path(output_dir).glob("checkpoint-*.pth")):
        if not CHECKPOINT_RE.search(path.name):
            continue
        try:
            epoch = int(torch_load(path, mmap=True).get("epoch", -1))
        except Exception as err:  # a partial or foreign file: never resume from it
            unreadable.append((path, err))
            continue
        if epoch > best_epoch or (epoch == best_epoch and path.name == "checkpoint-last.pth"):
            best, best_epoch = path, epoch
    return best, unreadable


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint (`checkpoint-<epoch>.pth` or `checkpoint-last.pth`) with the
    highest stored epoch in `output_dir`, or None. Files that fail to load are skipped (with a
    warning)."""
    best, unreadable = _scan_checkpoints(output_dir)
    for path, err in unreadable:
        log.warning("skipping unreadable checkpoint %s: %s", path, err)
    return best


def resolve_resume(resume: str, output_dir: str | os.PathLike | None) -> Path | None:
    """`--resume`: '' (none), 'auto' (the newest complete checkpoint in `output_dir`, or None when
    there is none yet: a fresh start) or a path, which must exist. With 'auto', checkpoint files
    of which none can be read are an `UnreadableCheckpointsError` naming them (not a silent fresh
    start beside the old log); an unreadable one among readable ones is skipped with a warning."""
    if not resume:
        return None
    if resume == "auto":
        found = None
        if output_dir and Path(output_dir).is_dir():
            found, unreadable = _scan_checkpoints(output_dir)
            if found is None and unreadable:
                path, err = unreadable[0]
                why = str(err) if isinstance(err, UserError) else f"{path}: {type(err).__name__}: {err}"
                why = " ".join(why.split())
                why = why if len(why) <= 240 else why[:237] + "..."
                raise UnreadableCheckpointsError(
                    f"--resume auto: no checkpoint in {output_dir} can be read "
                    f"({', '.join(p.name for p, _ in unreadable)}; {why}); "
                    "move them away to start fresh, or pass --resume FILE")
            for path, err in unreadable:
                log.warning("skipping unreadable checkpoint %s: %s", path, err)
        log.info("resume auto: %s", found or f"no checkpoint in {output_dir}, starting fresh")
        return found
    if not Path(resume).is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
    return Path(resume)
