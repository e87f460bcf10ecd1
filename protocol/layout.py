"""Trainable-parameter layout: names, shapes and offsets <-> one flat float32 vector.

Coordinator and devices exchange model weights and updates as one flat little-endian float32
vector; the layout says which slice is which parameter. Its hash is sent with every update so
that a vector can never be applied to a model of another shape.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Layout", "LayoutEntry", "LayoutError"]

FloatVec = npt.NDArray[np.float32]


class LayoutError(ValueError):
    """A vector or a set of tensors does not match the layout."""


class LayoutEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    shape: tuple[int, ...]
    offset: int = Field(ge=0)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Layout(BaseModel):
    """Ordered, contiguous parameter slices of one flat vector."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    entries: tuple[LayoutEntry, ...]

    @model_validator(mode="after")
    def _contiguous(self) -> Layout:
        offset = 0
        names: set[str] = set()
        for e in self.entries:
            if e.offset != offset:
                raise ValueError(f"entry {e.name!r} starts at {e.offset}, expected {offset}")
            if e.name in names:
                raise ValueError(f"duplicate entry {e.name!r}")
            if any(d < 0 for d in e.shape):
                raise ValueError(f"entry {e.name!r} has a negative dimension")
            names.add(e.name)
            offset += e.numel
        return self

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> Layout:
        entries, offset = [], 0
        for name, shape in shapes.items():
            entries.append(LayoutEntry(name=name, shape=tuple(shape), offset=offset))
            offset += math.prod(shape)
        return cls(entries=tuple(entries))

    @property
    def size(self) -> int:
        """Number of float32 elements in the flat vector."""
        return sum(e.numel for e in self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def hash(self) -> str:
        """SHA-256 (hex) of the canonical (name, shape) list: what both sides compare."""
        canon = json.dumps([[e.name, list(e.shape)] for e in self.entries], separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def flatten(self, tensors: Mapping[str, npt.ArrayLike]) -> FloatVec:
        """Concatenate named arrays in layout order into one float32 vector."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise LayoutError(f"missing tensors: {missing[:5]}")
        out = np.empty(self.size, dtype=np.float32)
        for e in self.entries:
            a = np.asarray(tensors[e.name], dtype=np.float32)
            if a.shape != e.shape:
                raise LayoutError(f"{e.name}: shape {a.shape} != layout {e.shape}")
            out[e.offset : e.offset + e.numel] = a.reshape(-1)
        return out

    def unflatten(self, vec: npt.ArrayLike) -> dict[str, FloatVec]:
        """Views of the flat vector, one per entry, in their shapes (no copies)."""
        v = self.check(vec)
        return {e.name: v[e.offset : e.offset + e.numel].reshape(e.shape) for e in self.entries}

    def check(self, vec: npt.ArrayLike) -> FloatVec:
        """The vector as float32 if it has this layout's length and only finite values."""
        v = np.asarray(vec)
        if v.ndim != 1 or v.shape[0] != self.size:
            raise LayoutError(f"vector has shape {v.shape}, layout needs ({self.size},)")
        if v.dtype != np.float32:
            v = v.astype(np.float32)
        if not np.isfinite(v).all():
            raise LayoutError("vector contains NaN or Inf")
        return v
