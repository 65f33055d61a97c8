"""The Mask type: one boolean tensor per pruned parameter, True = weight kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lightning_lth.errors import LTHError
from lightning_lth.io import load_tensors, save_tensors

FORMAT = "lightning_lth.mask/1"


@dataclass
class Mask:
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)  # model, width, target_sparsity, ...

    def __post_init__(self):
        self.tensors = {name: t.to(torch.bool) for name, t in self.tensors.items()}

    @property
    def total(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def zeros(self) -> int:
        return sum(int((~t).sum()) for t in self.tensors.values())

    def sparsity(self) -> float:
        """Fraction of the masked parameters' entries that are pruned."""
        return self.zeros / max(self.total, 1)

    def layer_sparsity(self) -> dict[str, float]:
        return {name: float((~t).sum()) / t.numel() for name, t in self.tensors.items()}

    def check_fits(self, model: nn.Module, model_name: str | None = None,
                   width: int | None = None) -> None:
        """Raise LTHError unless every masked name exists in the model with the same shape."""
        for key, expected in (("model", model_name), ("width", width)):
            have = self.meta.get(key)
            if expected is not None and have is not None and have != expected:
                raise LTHError(f"mask was made for {key}={have!r}, but the model has "
                               f"{key}={expected!r}")
        params = dict(model.named_parameters())
        for name, tensor in self.tensors.items():
            if name not in params:
                raise LTHError(f"mask entry {name!r} is not a parameter of the model; "
                               f"model parameters: {', '.join(list(params)[:6])}, ...")
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise LTHError(f"mask entry {name!r} has shape {tuple(tensor.shape)}, the "
                               f"model's parameter has {tuple(params[name].shape)}")

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Zero every pruned weight of the model in place."""
        params = dict(model.named_parameters())
        for name, keep in self.tensors.items():
            params[name].mul_(keep.to(params[name].device, params[name].dtype))

    def save(self, path: str | Path) -> None:
        meta = dict(self.meta, format=FORMAT, actual_sparsity=self.sparsity())
        save_tensors({"meta": meta, "masks": self.tensors}, path)

    @classmethod
    def load(cls, path: str | Path) -> Mask:
        data = load_tensors(path, what="mask file")
        meta = data.get("meta") if isinstance(data, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise LTHError(f"mask file {path} is not a lightning_lth mask (expected format "
                           f"{FORMAT!r})")
        masks = data.get("masks")
        if not isinstance(masks, dict) or not all(
                isinstance(name, str) and isinstance(t, torch.Tensor) for name, t in masks.items()):
            raise LTHError(f"mask file {path} is damaged: 'masks' must map parameter names to "
                           f"tensors")
        return cls(dict(masks), dict(meta))
