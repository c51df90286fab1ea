"""Checkpoint I/O, used by every script: load any MAE-family checkpoint into a pre-training model or
a classifier, export timm weights, and write checkpoints atomically.

Accepted sources (a path or an already loaded dict): official MAE checkpoints (`{"model": ...}`),
their encoder-only pre-training files, visualisation files with the decoder, fine-tuned and
linear-probe classifiers (head `head` or `head.0` BatchNorm / `head.1` Linear), U-MAE reference
checkpoints (their online-probe `fc.*` / `fc_norm.*` are ignored), this project's checkpoints, and
timm-format ViT weights (same key names). Every key is sorted into a group, each group has one
rule, and the report says exactly what was loaded, initialised fresh, resampled or ignored.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
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

from .errors import UserError, one_line

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
    legacy-format file, which cannot be mapped, is read whole).

    A file that cannot be loaded raises `UserError` naming the path and the cause: missing or
    unreadable, empty, a text file, not a checkpoint, truncated or corrupt, or refused as unsafe (a
    pickle that asks for anything beyond tensors, plain containers and `argparse.Namespace` is
    refused by the weights-only unpickler before any of it runs)."""
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
    model's structure and shapes; U-MAE online-probe keys (`fc.*`) are ignored.
    """
    src = extract_state_dict(source)
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


def export_timm_state_dict(
    source: str | os.PathLike | Mapping[str, Any], global_pool: bool, num_classes: int = 1000
) -> dict[str, torch.Tensor]:
    """An encoder as a timm ViT state dict, loadable with `strict=True` by
    `timm.create_model("vit_base_patch16_224", global_pool="avg" if global_pool else "token",
    num_classes=num_classes)` (and the other sizes). `fc_norm` and the head come from the source
    when it is a classifier with such a head, else they are freshly initialised (untrained)."""
    from .models_vit import VisionTransformerClassifier

    src = extract_state_dict(source)
    embed_dim = src["cls_token"].shape[-1]
    patch = src["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in src if k.startswith("blocks."))
    grid = _grid(src["pos_embed"].shape[1])
    # num_heads does not change any weight's shape; any divisor of the width will do.
    model = VisionTransformerClassifier(
        global_pool=global_pool, img_size=grid[0] * patch, patch_size=patch, embed_dim=embed_dim,
        depth=depth, num_heads=1, num_classes=num_classes, qkv_bias=True,
        mlp_ratio=src["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
    )
    load_pretrained(model, src)
    return model.state_dict()


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
