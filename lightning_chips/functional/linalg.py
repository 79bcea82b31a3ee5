"""The damped linear solves of the influence methods: ``v = M^{-1} u`` for CHIPS and TRAK (docs/methods.md, CHIPS).

* :func:`damped_cholesky_solve`: ``(M + lambda I) x = b`` for a PSD ``M``, retrying with more damping when the
  matrix is singular in floating point, and refusing NaN/inf.
* :func:`solve_direction`: ``v = M^{-1} u`` with ``M = sum_r w_r a_r a_r^T + lambda I`` over factored gradient
  atoms, by a JL sketch (``"sketch"``) or exactly through the atoms' Gram matrix (``"kernel"``, Woodbury), with
  the relative damping rule ``lambda = rho * trace(M_0) / k`` (a theta-space quantity for both solvers).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from torch import Tensor

from lightning_chips.functional.gradients import EndPointDirection, EndPointGrads
from lightning_chips.functional.sketch import IdentitySketch, SketchKind, SketchLayout, make_sketch

__all__ = ["KERNEL_MAX_BYTES", "Solver", "damped_cholesky_solve", "solve_direction"]

Solver = Literal["sketch", "kernel"]
DENSE_LIMIT = 20_000
"""Largest ``dim(theta)`` the exact dense solve accepts (a ``D x D`` float64 matrix)."""

_RETRIES = 8
"""Damping increases tried after a failed factorisation (each at least 10x the last)."""


def damped_cholesky_solve(
    matrix: Tensor, rhs: Tensor, damping: float, what: str, method: str = "CHIPS"
) -> tuple[Tensor, float]:
    """Solve ``(matrix + damping I) x = rhs`` for a PSD ``matrix`` and ``rhs`` ``[k]`` or ``[k, T]``; returns
    ``(x, damping used)``.

    A singular or (in floating point) indefinite ``matrix + damping I`` -- degenerate curvature samples such as
    identical or low-rank pool features with a tiny ``damping`` -- does not factorise. Then the damping is raised
    to ``max(10 * damping, 10 * eps * trace(matrix))`` and by 10x after each further failure, and a warning names
    the damping that was used. ``10 * eps * trace`` is the scale of the matrix's rounding error, so the first
    retries already factorise an exactly singular PSD matrix in float32 as in float64; an all-zero matrix gets
    damping 1 (``M = I``: the Newton step is the gradient itself).

    Raises:
        FloatingPointError: when ``matrix`` or ``rhs`` holds NaN or inf (non-finite features or end point), which
            no damping can repair.
    """
    if not bool(torch.isfinite(matrix).all()) or not bool(torch.isfinite(rhs).all()):
        raise FloatingPointError(
            f"{method}: the {what} matrix or its right-hand side holds NaN or inf, so no damping can make it "
            "solvable: the features or the end point are not finite (a diverged model?). Check the features of the "
            "target and the pool sample."
        )
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"{method}: the damping must be a finite number >= 0, got {damping}.")
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    trace = float(torch.diagonal(matrix).sum())
    floor = 10.0 * torch.finfo(matrix.dtype).eps * trace if trace > 0 else 1.0
    lam = damping
    for attempt in range(1 + _RETRIES):
        if attempt:
            lam = max(10.0 * lam, floor)
        chol, info = torch.linalg.cholesky_ex(matrix + lam * eye)
        if int(info) == 0:
            if attempt:
                warnings.warn(
                    f"{method}: the {what} matrix is singular or indefinite with damping {damping:.3g} (degenerate "
                    f"curvature samples, e.g. identical or low-rank pool features); solved with damping {lam:.6g} "
                    "instead. Pass a `damping` at least that large, or None (the relative rule), to silence this.",
                    stacklevel=3,
                )
            if rhs.dim() == 1:
                return torch.cholesky_solve(rhs[:, None], chol)[:, 0], lam
            return torch.cholesky_solve(rhs, chol), lam
    raise RuntimeError(
        f"{method}: the {what} matrix does not factorise even with damping {lam:.3g} (its trace is {trace:.3g}); "
        "pass a larger `damping`."
    )


KERNEL_MAX_BYTES = 4 * 2**30
"""Largest Gram matrix (+ Cholesky factor) the kernel solver builds; beyond it, it refuses before allocating."""


def solve_direction(
    atoms: EndPointGrads,
    weights: Tensor,
    u: EndPointDirection,
    *,
    solver: Solver = "sketch",
    sketch_dim: int | None = 512,
    sketch: SketchKind = "gaussian",
    sketch_layout: SketchLayout = "khatri_rao",
    damping: float | None = None,
    relative_damping: float = 1e-3,
    seed: int = 0,
    exact_when_small: bool = True,
    chunk_size: int = 8192,
    method: str = "CHIPS",
) -> tuple[EndPointDirection, float, int]:
    """``v = M^{-1} u`` with ``M = sum_r w_r a_r a_r^T + lambda I`` (sketched, exact dense, or kernel).

    Returns ``(v, lambda, k)`` where ``k`` is the dimension the solve ran in (sketch dim, ``dim(theta)`` or
    the number of atoms for the kernel path, whose ``lambda`` rule still uses ``dim(theta)``) and ``lambda`` the
    damping actually used (``damping``, or ``relative_damping * trace / k``: the same theta-space damping for every
    solver, module docstring): a matrix that does not factorise with the given one is solved with more damping and a
    warning (:func:`damped_cholesky_solve`). ``method`` names the caller in messages (``"CHIPS"``, ``"TRAK"``).
    """
    dtype = u.image_proj.dtype
    if solver == "kernel":
        r = len(atoms)
        need = 2 * r * r * torch.finfo(dtype).bits // 8  # the Gram matrix and its Cholesky factor
        if need > KERNEL_MAX_BYTES:
            raise ValueError(
                f"The kernel solver needs an R x R Gram matrix over R = {r:,} curvature atoms ({need / 2**30:.1f} GiB, "
                f"over the {KERNEL_MAX_BYTES / 2**30:.0f} GiB limit); use solver='sketch', or fewer "
                "curvature_samples / negatives_per_sample."
            )
        if damping is not None and damping <= 0:
            raise ValueError(f"The kernel solver divides by the damping: pass damping > 0 or None, got {damping}.")
        sw = weights.sqrt()
        gram = atoms.gram() * sw[:, None] * sw[None, :]
        dim = atoms.dim
        lam = damping if damping is not None else relative_damping * float(torch.diagonal(gram).sum()) / dim
        rhs = sw * atoms.dot(u)
        z, lam = damped_cholesky_solve(gram, rhs, lam, "kernel (Woodbury)", method)
        v = (u - atoms.weighted_sum(sw * z)) * (1.0 / lam)
        return v, lam, len(atoms)
    if solver != "sketch":
        raise ValueError(f"Unknown solver {solver!r}; use 'sketch' or 'kernel'.")
    d_v, e = u.image_proj.shape
    d_t = u.text_proj.shape[0]
    projector = make_sketch(
        d_v, d_t, e, sketch_dim=sketch_dim, image_bias=u.image_bias is not None, text_bias=u.text_bias is not None,
        logit_bias=u.logit_bias is not None, kind=sketch, seed=seed, dtype=dtype, device=u.image_proj.device,
        exact_when_small=exact_when_small, layout=sketch_layout,
    )  # fmt: skip
    k = projector.dim
    if isinstance(projector, IdentitySketch) and k > DENSE_LIMIT:
        raise ValueError(
            f"The exact dense solve needs a {k} x {k} matrix (dim(theta) = {k}); pass a `sketch_dim` or use "
            "solver='kernel', which is exact at the cost of an atoms x atoms Gram matrix."
        )
    matrix = torch.zeros(k, k, dtype=dtype, device=u.image_proj.device)
    for start in range(0, len(atoms), chunk_size):
        idx = torch.arange(start, min(start + chunk_size, len(atoms)), device=weights.device)
        sk = projector.sketch_grads(atoms.index(idx))
        matrix += sk.T @ (sk * weights[idx, None])
    lam = damping if damping is not None else relative_damping * float(torch.diagonal(matrix).sum()) / k
    v_sketched, lam = damped_cholesky_solve(matrix, projector.sketch_direction(u), lam, "curvature", method)
    return projector.transpose(v_sketched), lam, k
