"""Checkpoints: one file holds the model, its settings, the optimiser, the step and RNG state.

A checkpoint is a ``torch.save`` dict with ``format == "cnf-checkpoint"`` that holds only
tensors and plain Python types (dict, list, tuple, str, int, float, bool, None), so that
``torch.load(path, weights_only=True)`` reads it: loading a checkpoint never runs code. It
carries two SHA-256 checksums, verified on every read, so a damaged file is refused rather than
loaded: one of its bytes (in the zip comment, which ``torch.load`` ignores) and one of its
content (:func:`payload_digest`, independent of how the bytes were pickled). Writes are durable and atomic
(:func:`cnf.outputs.atomic_write_bytes`). The training history is not stored here; it lives
in the run's ``train_log.jsonl``.

Flows built from cnf's own parts (CNF with an MLPField, PlanarFlow) are rebuilt from the stored
``config``; a flow with a custom field is restored by passing it as ``flow=`` to
:func:`load_checkpoint`. Checkpoints of cnf 0.1 (``version`` 1) that pickled numpy RNG states
can only be read by unpickling them; :func:`convert_trusted_checkpoint` (``cnf
convert-checkpoint``) rewrites one that you trust into this format.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnf.outputs import atomic_write_bytes

FORMAT = "cnf-checkpoint"
VERSION = 2
CHECKSUM_KEY = "checksum"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely: damaged, unsafe, foreign or from a newer cnf."""


def build_flow(config: dict[str, Any]) -> nn.Module:
    """Rebuild a flow from ``flow.config()``."""
    from cnf.fields import MLPField
    from cnf.flow import CNF
    from cnf.solver import Solver

    kind = config.get("kind")
    if kind == "conditional_planar":
        from cnf.planar import ConditionalPlanarFlow

        return ConditionalPlanarFlow(
            config["dim"], config["layers"], config["context_dim"], hidden=config.get("hidden", (64,))
        )
    if kind == "cnf":
        if config.get("field") is None:
            raise ValueError(
                "this checkpoint's CNF has a custom velocity field that cannot be rebuilt from its "
                "config; pass the flow to restore into: load_checkpoint(path, flow=my_flow)"
            )
        field_config = dict(config["field"])
        field_kind = field_config.pop("kind", "mlp")
        if field_kind == "conv":
            from cnf.fields.conv import ConvField

            field = ConvField(**field_config)
        elif field_kind == "unet":
            from cnf.fields.unet import UNetField

            field = UNetField(**field_config)
        else:
            field = MLPField(**field_config)
        return CNF(
            field,
            config["dim"],
            divergence=config["divergence"],
            noise=config["noise"],
            solver=Solver.from_dict(config["solver"]),
        )
    if kind == "multiscale":
        from cnf.multiscale import MultiScaleCNF

        return MultiScaleCNF.from_config(config)
    if kind == "transformed":  # a flow with its preprocessing (cnf.transforms)
        from cnf.transforms import TransformedFlow, build_transform

        if config.get("flow") is None:
            raise ValueError("this checkpoint's preprocessed flow wraps a custom flow; pass flow= to restore into")
        return TransformedFlow(build_flow(config["flow"]), build_transform(config["preprocess"]))
    if kind == "vae":
        from cnf.vae import VAE

        return VAE.from_config(config)
    if kind == "planar":
        from cnf.planar import PlanarFlow

        return PlanarFlow(config["dim"], config["layers"], activation=config.get("activation", "tanh"))
    raise ValueError(f"unknown flow kind {kind!r} in checkpoint config")


# -- RNG states as tensors and plain lists ------------------------------------------------------
def _plain_rng(torch_state: torch.Tensor, numpy_state: tuple, python_state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = numpy_state
    version, internal, gauss_next = python_state
    return {
        "torch": torch_state,
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [int(version), [int(v) for v in internal], gauss_next],
    }


def rng_state() -> dict[str, Any]:
    """The torch, numpy and Python RNG states as tensors and plain lists (``weights_only``-safe)."""
    return _plain_rng(torch.get_rng_state(), np.random.get_state(), random.getstate())


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# -- checksum ----------------------------------------------------------------------------------
def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint entry {where} has a key of type {type(key).__name__}: {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise TypeError(
        f"checkpoint entry {where} is a {type(value).__name__}; checkpoints hold only tensors and "
        "plain Python types (dict, list, tuple, str, int, float, bool, None)"
    )


def _feed(hasher: Any, value: Any) -> None:
    """Feed a canonical, type-tagged encoding of ``value`` into ``hasher``."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        header = f"T{tensor.dtype}{tuple(tensor.shape)}".encode()
        hasher.update(struct.pack("<Q", len(header)) + header)
        if tensor.numel():
            hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        hasher.update(b"D" + struct.pack("<Q", len(value)))
        for key in sorted(value, key=lambda k: (type(k).__name__, str(k))):
            _feed(hasher, key)
            _feed(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        hasher.update(b"L" + struct.pack("<Q", len(value)))
        for item in value:
            _feed(hasher, item)
    elif isinstance(value, str):
        data = value.encode("utf-8")
        hasher.update(b"S" + struct.pack("<Q", len(data)) + data)
    elif isinstance(value, (bool, int, float)) or value is None:
        data = f"{type(value).__name__}:{value!r}".encode()
        hasher.update(b"P" + struct.pack("<Q", len(data)) + data)
    else:
        raise TypeError(f"cannot checksum a {type(value).__name__}")


def payload_digest(payload: dict[str, Any]) -> str:
    """SHA-256 (hex) over every entry of ``payload`` except the checksum itself.

    Tensors enter as dtype, shape and raw bytes; other values by a type-tagged encoding with
    sorted dict keys, so the digest depends on the content only, not on pickling details.
    """
    hasher = hashlib.sha256()
    _feed(hasher, {key: value for key, value in payload.items() if key != CHECKSUM_KEY})
    return hasher.hexdigest()


# -- writing and reading -----------------------------------------------------------------------
_END_OF_ZIP = b"PK\x05\x06"
_TRAILER_TAG = b"cnf-sha256:"
_TRAILER_LENGTH = len(_TRAILER_TAG) + 64


def _with_file_checksum(raw: bytes) -> bytes:
    """Put the SHA-256 of the file into its zip comment: then any changed byte is detected.

    ``torch.save`` writes a zip archive ending in the end-of-central-directory record with an
    empty comment (its last two bytes); the digest covers every byte before that length field.
    """
    if raw[-22:-18] != _END_OF_ZIP or raw[-2:] != b"\x00\x00":  # pragma: no cover - format change
        raise RuntimeError("torch.save wrote an unexpected archive layout; cannot add the file checksum")
    comment = _TRAILER_TAG + hashlib.sha256(raw[:-2]).hexdigest().encode()
    return raw[:-2] + len(comment).to_bytes(2, "little") + comment


def _verify_file_checksum(raw: bytes, path: Path) -> bool:
    """True if ``raw`` carries a file checksum and it matches; a wrong one raises CheckpointError."""
    tail = raw[-_TRAILER_LENGTH:]
    if not tail.startswith(_TRAILER_TAG):
        return False
    body = raw[: -_TRAILER_LENGTH - 2]
    if raw[-_TRAILER_LENGTH - 2 : -_TRAILER_LENGTH] != _TRAILER_LENGTH.to_bytes(2, "little") or (
        hashlib.sha256(body).hexdigest().encode() != tail[len(_TRAILER_TAG) :]
    ):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: its bytes do not match the SHA-256 checksum stored in it"
        )
    return True


def checkpoint_bytes(payload: dict[str, Any]) -> bytes:
    """``payload`` with its content checksum, serialised by ``torch.save``, plus the file checksum."""
    _check_plain(payload, "payload")
    payload = {**payload, CHECKSUM_KEY: {"algorithm": "sha256", "hex": payload_digest(payload)}}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return _with_file_checksum(buffer.getvalue())


def save_checkpoint(path: str | os.PathLike, flow: nn.Module, **extra: Any) -> Path:
    """Write ``flow`` (config + weights) and any ``extra`` entries durably and atomically to ``path``.

    ``extra`` values must be tensors or plain Python types; anything else is a TypeError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = flow.config() if callable(getattr(flow, "config", None)) else None
    payload = {"format": FORMAT, "version": VERSION, "config": config, "state_dict": flow.state_dict(), **extra}
    return atomic_write_bytes(path, checkpoint_bytes(payload))


_CONVERT_HINT = (
    "if you trust this file (e.g. a checkpoint you wrote with cnf 0.1), convert it once with "
    "`cnf convert-checkpoint {path} NEW.pt` (cnf.checkpoint.convert_trusted_checkpoint), which "
    "unpickles it; never do that with a file from someone you do not trust"
)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True`` and verify its format, version and checksum.

    Raises FileNotFoundError for a missing file and :class:`CheckpointError` (a ValueError) naming
    the file and the reason for a damaged, unsafe, foreign or too new one.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} is a folder; pass a file in it: best.pt (the best validation "
            "weights) or checkpoint.pt (the last weights)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    raw = path.read_bytes()
    file_checked = _verify_file_checksum(raw, path)
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines()]
        unsafe = next((line for line in lines if "GLOBAL" in line), None)
        if unsafe is not None:
            raise CheckpointError(
                f"checkpoint {str(path)!r} refused: it holds objects other than tensors and plain Python "
                f"types, which only a full unpickle can rebuild, and unpickling can run code ({unsafe}); "
                + _CONVERT_HINT.format(path=path)
            ) from None
        detail = next((line for line in lines if "Unsupported" in line), "unreadable pickle")
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a torch file ({detail})") from None
    except Exception as error:  # torch raises several types for a damaged file
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a torch file ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a cnf checkpoint (no 'format': {FORMAT!r})")
    version = payload.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid version {version!r}")
    if version > VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has version {version}, newer than this cnf reads ({VERSION}); "
            "upgrade cnf"
        )
    stored = payload.get(CHECKSUM_KEY)
    if version >= 2 and not file_checked:
        raise CheckpointError(f"checkpoint {str(path)!r} has no file checksum; it was altered or truncated")
    if version >= 2 or stored is not None:
        if not isinstance(stored, dict) or stored.get("algorithm") != "sha256":
            raise CheckpointError(f"checkpoint {str(path)!r} has no valid checksum; it may be damaged")
        try:
            actual = payload_digest(payload)
        except TypeError as error:
            raise CheckpointError(f"checkpoint {str(path)!r} holds an unexpected entry: {error}") from None
        if actual != stored.get("hex"):
            raise CheckpointError(
                f"checkpoint {str(path)!r} is damaged: its content does not match its SHA-256 checksum "
                f"(stored {str(stored.get('hex'))[:12]}..., computed {actual[:12]}...)"
            )
    return payload


def load_checkpoint(
    path: str | os.PathLike, flow: nn.Module | None = None, *, device: str | torch.device | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Return ``(flow, checkpoint)``: the flow with its weights restored, and the raw dict.

    A ``flow`` passed in must have the checkpoint's architecture; a mismatch is a ValueError that
    names the settings that differ. Tensors are read onto the CPU (whatever device wrote them);
    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; see
    :func:`cnf.distributed.resolve_device`) then moves the flow.
    """
    payload = read_checkpoint(path)
    if flow is None:
        if payload.get("config") is None:
            raise ValueError(f"checkpoint {str(path)!r} has no config; pass flow= to restore into")
        flow = build_flow(payload["config"])
    load_weights(flow, payload["state_dict"], payload.get("config"), path)
    if device is not None:
        from cnf.distributed import place

        place(flow, device)
    return flow, payload


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """``name: saved -> current`` for every entry that differs between two configs.

    Nested dicts and lists of them (a preprocessing pipeline) are compared entry by entry, tensors
    (a whitening's mean and matrix) by value."""
    name = prefix.rstrip(".")
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out += config_differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    if isinstance(saved, torch.Tensor) or isinstance(current, torch.Tensor):
        same = (
            isinstance(saved, torch.Tensor)
            and isinstance(current, torch.Tensor)
            and saved.shape == current.shape
            and torch.equal(saved.detach().cpu().to(current.dtype), current.detach().cpu())
        )
        return [] if same else [f"{name}: the checkpoint's tensor differs from this one"]
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        saved, current = list(saved), list(current)
        nested = any(isinstance(v, (dict, list, tuple, torch.Tensor)) for v in saved + current)
        if nested and len(saved) == len(current):
            out = []
            for index, (a, b) in enumerate(zip(saved, current)):
                out += config_differences(a, b, f"{prefix}{index}.")
            return out
    return [] if saved == current else [f"{name}: {saved!r} in the checkpoint, {current!r} here"]


def load_weights(
    flow: nn.Module, state_dict: dict[str, Any], config: dict[str, Any] | None, path: str | os.PathLike
) -> None:
    """``flow.load_state_dict`` with an error that names the differing architecture settings."""
    try:
        flow.load_state_dict(state_dict)
    except RuntimeError as error:
        current = flow.config() if callable(getattr(flow, "config", None)) else None
        diffs = [d for d in config_differences(config, current) if not d.startswith("solver")]
        detail = "; ".join(diffs) if diffs and config is not None else str(error).splitlines()[0]
        raise ValueError(
            f"checkpoint {str(path)!r} holds a different model than the one to restore into: {detail}"
        ) from None


def convert_trusted_checkpoint(old: str | os.PathLike, new: str | os.PathLike) -> Path:
    """Rewrite a checkpoint of cnf 0.1 (pickled numpy RNG state, history inside) safely.

    **This unpickles ``old``, which can run arbitrary code: use it only on files you trust.**
    The history is dropped (it is in the run's ``train_log.jsonl``); the rest is kept.
    """
    old, new = Path(old), Path(new)
    if not old.is_file():
        raise FileNotFoundError(f"checkpoint {str(old)!r} does not exist")
    payload = torch.load(old, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(old)!r} is not a cnf checkpoint (no 'format': {FORMAT!r})")
    payload = dict(payload)
    payload.pop("history", None)
    payload.pop(CHECKSUM_KEY, None)
    rng = payload.get("rng")
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
        payload["rng"] = _plain_rng(rng["torch"], rng["numpy"], rng["python"])
    payload["version"] = VERSION
    return atomic_write_bytes(new, checkpoint_bytes(payload))
