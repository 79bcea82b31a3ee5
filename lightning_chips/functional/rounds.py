"""What every scoring round does first: its inputs in one dtype on the pool's device (:func:`round_inputs`) and
its seeded subsets of the pool (:func:`subsample`: the bank, the curvature sample, TRAK's training sample)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_chips.endpoint import EndPoint

__all__ = ["round_inputs", "subsample"]


def subsample(n: int, size: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """Sorted indices of a seeded subset of ``size`` out of ``n`` (all of them when ``size >= n``)."""
    if size >= n:
        return torch.arange(n, device=device)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=generator)[:size].sort().values.to(device)


def round_inputs(
    endpoint: EndPoint,
    target_image: Tensor,
    target_text: Tensor,
    pool_image: Tensor,
    pool_text: Tensor,
    pool_ids: Tensor | None,
    dtype: torch.dtype,
) -> tuple[EndPoint, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The inputs of a scoring round in one dtype on the pool's device, with a detached end point and pool ids
    (``arange(N)`` when None).

    Raises:
        FloatingPointError: NaN or inf in the features (naming the first target rows and pool ids), which would
            otherwise spread into every score or fail deep inside the solve.
    """
    device = pool_image.device
    ep = endpoint.detach().to(dtype=dtype, device=device)
    ids = torch.arange(len(pool_image), device=device) if pool_ids is None else pool_ids.to(device)
    for what, image, text, names in (
        ("target rows", target_image, target_text, None),
        ("pool ids", pool_image, pool_text, ids),
    ):
        bad = ~(torch.isfinite(image).all(1) & torch.isfinite(text).all(1))
        if bool(bad.any()):
            where = torch.nonzero(bad).flatten() if names is None else names[bad]
            raise FloatingPointError(
                f"{int(bad.sum())} feature rows hold NaN or inf ({what} {where[:5].tolist()}): the model may have "
                "diverged or the features are corrupt."
            )
    return (
        ep, target_image.to(device, dtype), target_text.to(device, dtype), pool_image.to(dtype), pool_text.to(dtype),
        ids,
    )  # fmt: skip
