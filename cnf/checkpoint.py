"""Checkpoints: one file holds the model, its settings, the optimiser, the step and RNG state.

A checkpoint is a ``torch.save`` dict with ``format == "cnf-checkpoint"``. Flows built from
cnf's own parts (CNF with an MLPField, PlanarFlow) are rebuilt from the stored ``config``;
a flow with a custom field is restored by passing it as ``flow=`` to :func:`load_checkpoint`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT = "cnf-checkpoint"
VERSION = 1


def build_flow(config: dict[str, Any]) -> nn.Module:
    """Rebuild a flow from ``flow.config()``."""
    from cnf.fields import MLPField
    from cnf.flow import CNF
    from cnf.solver import Solver

    kind = config.get("kind")
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
    if kind == "planar":
        from cnf.planar import PlanarFlow

        return PlanarFlow(config["dim"], config["layers"], activation=config.get("activation", "tanh"))
    raise ValueError(f"unknown flow kind {kind!r} in checkpoint config")


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: str | os.PathLike, flow: nn.Module, **extra: Any) -> Path:
    """Write ``flow`` (config + weights) and any ``extra`` entries atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = flow.config() if callable(getattr(flow, "config", None)) else None
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": config,
        "state_dict": flow.state_dict(),
        **extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leaves a half-written checkpoint behind
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict, with clear errors for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for a damaged file
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or not a torch file: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} is not a cnf checkpoint (no 'format': {FORMAT!r})")
    return payload


def load_checkpoint(
    path: str | os.PathLike, flow: nn.Module | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Return ``(flow, checkpoint)``: the flow with its weights restored, and the raw dict."""
    payload = read_checkpoint(path)
    if flow is None:
        if payload.get("config") is None:
            raise ValueError(f"checkpoint {str(path)!r} has no config; pass flow= to restore into")
        flow = build_flow(payload["config"])
    flow.load_state_dict(payload["state_dict"])
    return flow, payload
