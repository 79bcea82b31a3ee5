"""Johnson-Lindenstrauss sketches ``P`` of CLIP's end-point space that never form a per-sample ``d_v x e`` gradient.

One module because it is one interface in three layouts (Khatri-Rao, Kronecker, TensorSketch) plus the identity,
each with the same three maps (gradients, dense directions, transpose) that must stay exact adjoints.

docs/methods.md, CHIPS (solvers). theta = ``(W_v [d_v x e], W_t [d_t x e], logit_scale, [b_v], [b_t],
[logit_bias])`` and every per-sample gradient is rank one per block, ``g = (h_v (x) d_v, h_t (x) d_t, s, [d_v], [d_t],
[beta])`` (:class:`EndPointGrads`; SigLIP's ``logit_bias`` is one more scalar coordinate, sketched like the logit
scale, with its random factors drawn after all the others so an end point without one gets the same sketch as
before). A bias rides along by augmenting ``h`` with a constant 1: ``[h; 1] (x) d`` holds both
the matrix and the bias gradient, so the image block has ``H_v = d_v + 1`` rows with an image bias (else ``d_v``),
likewise ``H_t``. Every layout draws its randomness on the CPU from ``torch.Generator().manual_seed(seed)`` (the
same sketch on every device and rank) and
has ``E[P^T P] = I``.

``"khatri_rao"`` (the default; a row-wise tensor random projection). Row ``j`` of ``P`` is

.. math::

    P_j = \\tfrac{1}{\\sqrt{k}}\\,\\big(a_j \\otimes b_j,\\ a'_j \\otimes b'_j,\\ c_j\\big), \\qquad
    (P g)_j = \\tfrac{1}{\\sqrt{k}}\\big[(a_j \\cdot h_v)(b_j \\cdot d_v) + (a'_j \\cdot h_t)(b'_j \\cdot d_t)
    + c_j\\, s\\ [+\\ c'_j\\, \\beta]\\big]

with independent ``a_j in R^{H_v}``, ``b_j in R^e``, ``a'_j in R^{H_t}``, ``b'_j in R^e``, ``c_j`` of i.i.d.
``N(0, 1)`` (``kind="gaussian"``) or ``+-1`` (``"rademacher"``) entries, for ``j = 1..k`` (and ``c'_j`` for a logit
bias). The realised dimension is ``sketch_dim`` exactly. ``P g`` for ``N`` samples is four matmuls,
``O(N k (d_v + d_t + 2e))``; a dense direction ``V`` is sketched as ``((A V) * B).sum(1)`` and ``P^T z`` is
``A^T diag(z) B`` per block, ``O(k (d_v + d_t) e)``.

``"kronecker"`` (the earlier layout, :class:`EndPointSketch`): ``P = P_h (x) P_d`` per block and the logit scale
kept as is; the budget is split between the blocks in proportion to their sizes and each block's ``k_h x k_d``
grid follows its aspect ratio, so the realised dimension is at most ``sketch_dim`` (493 for ``sketch_dim=512`` on
``d_v=1280, d_t=384, e=128``, with ``k_d = 6``). Cost ``O(N (H_v k_h + e k_d + k))`` per block.

``"tensorsketch"`` (:class:`TensorSketch`): a count sketch of each factor (hash ``H -> [k]`` and ``e -> [k]`` with
random signs) multiplied in the FFT domain, which is the count sketch of ``h (x) d`` with bucket
``(i + l) mod k``; blocks and the scale share the ``k`` buckets. Cost ``O(N (d_v + d_t + e + k log k))``; ``kind``
does not apply (the signs are always ``+-1``). Its directions use ``index_add_``, which is bitwise reproducible on
the CPU but accumulates in a device-dependent order on CUDA.

Why Khatri-Rao is the default: the error of ``<P x, P y>`` as an estimate of ``x . y``. For rank-one
``x = h (x) d``, ``y = h' (x) d'`` with cosines ``c_h = cos(h, h')``, ``c_d = cos(d, d')`` and Gaussian entries,
``Var / (|x| |y|)^2`` is

* Kronecker: ``c_h^2 (1 + c_d^2) / k_d + c_d^2 (1 + c_h^2) / k_h + (1 + c_h^2)(1 + c_d^2) / (k_h k_d)``: the
  product of two JL estimates, so for a norm (``x = y``) about ``2/k_h + 2/k_d``. The smaller factor dominates as
  soon as one side is aligned: pre-projection features are far from isotropic (mean cosine ~0.3 between the
  benchmark's pool image features) and the curvature atoms of one sample share its ``h`` exactly (``c_h = 1``),
  which with ``k_d = 6`` is a relative error of ~40% whatever ``k_h`` is.
* Khatri-Rao: ``[(1 + 2 c_h^2)(1 + 2 c_d^2) - c_h^2 c_d^2] / k`` (Isserlis per row; rows are i.i.d.), i.e.
  ``(1 + ...)/k`` with the whole budget ``k`` in the denominator: at most ``8/k`` (a norm), ``3/k`` for aligned
  features and orthogonal embedding-side factors; Rademacher entries have smaller fourth moments, so at most that.

Cost: each Khatri-Rao coordinate takes ``d_v + d_t + 2e`` multiply-adds per sample, against about
``d_v / k_d + e / k_h + 1`` for a Kronecker one, but the ``k x k`` curvature matrix ``P M P^T`` the solver
accumulates costs ``O(N k^2)`` with either, so a whole sketched solve is under 2x slower (measured: 0.8 s vs
0.5 s at ``k = 512``, 3.3 s vs 1.9 s at ``k = 2048`` for 9,216 atoms on 2 CPU cores). The factors take
``k (d_v + d_t + 2e + 1)`` numbers (8 MB at ``k = 512``). ``docs/benchmarks/sketch_fidelity.md`` measures the
layouts on the selection benchmark's end point: Khatri-Rao raises the Spearman of the sketched alignment with the
exact one at every ``k`` and damping (0.24 -> 0.28 at ``k = 512``, 0.21 -> 0.30 at ``k = 2048``) and cuts the norm
error about 5x; at these ``k`` every layout stays far from the exact ranking (the sketched solve, not the layout,
is the larger error there).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_chips.functional.gradients import EndPointDirection, EndPointGrads

__all__ = [
    "EndPointSketch",
    "IdentitySketch",
    "KhatriRaoSketch",
    "KroneckerSketch",
    "RandomSketch",
    "Sketch",
    "SketchKind",
    "SketchLayout",
    "TensorSketch",
    "make_sketch",
]

SketchKind = Literal["gaussian", "rademacher"]
SketchLayout = Literal["khatri_rao", "kronecker", "tensorsketch"]
LAYOUTS: tuple[str, ...] = ("khatri_rao", "kronecker", "tensorsketch")
_CHUNK_ELEMENTS = 1 << 22  # samples x k per chunk of sketch_grads: bounded temporaries (32 MB in float64)


def _entries(rows: int, cols: int, kind: SketchKind, generator: torch.Generator) -> Tensor:
    """``[rows, cols]`` i.i.d. unit-variance float64 entries: ``N(0, 1)`` or ``+-1``."""
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    if kind == "rademacher":
        signs = torch.randint(0, 2, (rows, cols), generator=generator, dtype=torch.int64)
        return 2.0 * signs.to(torch.float64) - 1.0
    raise ValueError(f"Unknown sketch kind {kind!r}; use 'gaussian' or 'rademacher'.")


def _random_matrix(rows: int, cols: int, kind: SketchKind, generator: torch.Generator) -> Tensor:
    return _entries(rows, cols, kind, generator) / math.sqrt(rows)


def _augment(h: Tensor, bias: bool) -> Tensor:
    return torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1) if bias else h


def _with_bias_rows(direction: EndPointDirection, image_bias: bool, text_bias: bool) -> tuple[Tensor, Tensor]:
    """The ``[H_v, e]`` and ``[H_t, e]`` blocks of a direction, a bias appended as the last row."""
    wv, wt = direction.image_proj, direction.text_proj
    if image_bias:
        wv = torch.cat([wv, direction.image_bias[None, :]], dim=0)
    if text_bias:
        wt = torch.cat([wt, direction.text_bias[None, :]], dim=0)
    return wv, wt


def _split_bias_rows(wv: Tensor, wt: Tensor, scale: Tensor, image_bias: bool, text_bias: bool) -> EndPointDirection:
    """Inverse of :func:`_with_bias_rows`."""
    b_v = b_t = None
    if image_bias:
        wv, b_v = wv[:-1], wv[-1]
    if text_bias:
        wt, b_t = wt[:-1], wt[-1]
    return EndPointDirection(wv, wt, scale, b_v, b_t)


def _check_bias(grads: EndPointGrads, logit_bias: bool) -> None:
    """Refuse gradients whose logit-bias coordinate does not match the sketch's theta-space."""
    if (grads.bias is not None) != logit_bias:
        has = "have" if grads.bias is not None else "have no"
        built = "with" if logit_bias else "without"
        raise ValueError(
            f"The gradients {has} a logit-bias coordinate but the sketch was built {built} one: build it with "
            f"logit_bias={grads.bias is not None} (the end point's logit_bias is not None)."
        )


def _grid(budget: int, rows: int, cols: int) -> tuple[int, int]:
    """Split a block budget into ``k_h x k_d`` following the block's aspect ratio ``rows : cols``."""
    budget = max(1, budget)
    k_h = max(1, min(budget, round(math.sqrt(budget * rows / cols))))
    k_d = max(1, budget // k_h)
    return k_h, k_d


class RandomSketch:
    """What the three random layouts share: the constructor and the end point's bias flags.

    The constructor validates ``sketch_dim`` (:meth:`_check_dim`) and ``kind``, stores the flags, ``kind`` and
    ``seed``, and hands the row counts ``H_v = d_v [+ 1]``, ``H_t = d_t [+ 1]`` and ``e`` to the layout's
    :meth:`_draw` with a CPU generator seeded by ``seed`` (the same sketch on every device and rank). Every layout
    maps gradients (``sketch_grads``), dense directions (``sketch_direction``) and back (``transpose``), exact
    adjoints of one another.

    Args:
        image_dim: ``d_v``.
        text_dim: ``d_t``.
        embed_dim: ``e``.
        sketch_dim: ``k``: the realised dimension (Khatri-Rao, TensorSketch) or the total budget (Kronecker).
        image_bias: the end point has an image bias.
        text_bias: the end point has a text bias.
        logit_bias: the end point has SigLIP's logit bias (one more scalar coordinate).
        kind: ``"gaussian"`` (``N(0, 1)`` factor entries) or ``"rademacher"`` (``+-1``).
        seed: seed of the CPU generator that draws the random factors.
        dtype: dtype of the factors when applied.
        device: device of the factors when applied.
    """

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        embed_dim: int,
        *,
        sketch_dim: int,
        image_bias: bool = False,
        text_bias: bool = False,
        logit_bias: bool = False,
        kind: SketchKind = "gaussian",
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        self._check_dim(sketch_dim, logit_bias)
        if kind not in ("gaussian", "rademacher"):
            raise ValueError(f"Unknown sketch kind {kind!r}; use 'gaussian' or 'rademacher'.")
        self.image_bias, self.text_bias, self.logit_bias = image_bias, text_bias, logit_bias
        self.kind = kind
        self.seed = seed
        rows_v, rows_t = image_dim + int(image_bias), text_dim + int(text_bias)
        generator = torch.Generator().manual_seed(int(seed))
        self._draw(sketch_dim, rows_v, rows_t, embed_dim, kind, generator, dtype, device)

    @staticmethod
    def _check_dim(sketch_dim: int, logit_bias: bool) -> None:
        if sketch_dim < 1:
            raise ValueError(f"`sketch_dim` must be >= 1, got {sketch_dim}.")

    def _draw(self, sketch_dim: int, rows_v: int, rows_t: int, embed_dim: int, kind: SketchKind,
              generator: torch.Generator, dtype: torch.dtype, device: torch.device | str) -> None:  # fmt: skip
        """Draw the layout's random factors from ``generator`` (in a fixed order: the sketch is the seed's)."""
        raise NotImplementedError


class KhatriRaoSketch(RandomSketch):
    """The ``"khatri_rao"`` layout (default): row ``j`` of ``P`` is ``(a_j (x) b_j, a'_j (x) b'_j, c_j) / sqrt(k)``.

    ``(P g)_j = [(a_j . h_v)(b_j . d_v) + (a'_j . h_t)(b'_j . d_t) + c_j s (+ c'_j beta)] / sqrt(k)`` with ``h``
    augmented by a constant 1 for a bias (module docstring: formula, variance, cost). ``E[P^T P] = I`` and
    :attr:`dim` is ``sketch_dim`` exactly.

    Args: those of :class:`RandomSketch`; ``sketch_dim`` is ``k``, the realised dimension.

    Example::

        >>> import torch
        >>> sk = KhatriRaoSketch(64, 32, 16, sketch_dim=100, image_bias=True, seed=0)
        >>> sk.dim
        100
        >>> g = EndPointGrads(torch.randn(5, 64, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64),
        ...                   torch.randn(5, 32, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64),
        ...                   torch.randn(5, dtype=torch.float64), image_bias=True)
        >>> sk.sketch_grads(g).shape
        torch.Size([5, 100])
        >>> z = torch.randn(100, dtype=torch.float64)  # adjoint: <P g, z> = <g, P^T z>
        >>> torch.allclose(sk.sketch_grads(g) @ z, g.dot(sk.transpose(z)))
        True
    """

    def _draw(self, sketch_dim: int, rows_v: int, rows_t: int, embed_dim: int, kind: SketchKind,
              generator: torch.Generator, dtype: torch.dtype, device: torch.device | str) -> None:  # fmt: skip
        k = int(sketch_dim)
        # 1/sqrt(k) rides on the h-side factors and the scale column, so each row is (a (x) b) / sqrt(k).
        factors = [
            _entries(k, rows_v, kind, generator) / math.sqrt(k),
            _entries(k, embed_dim, kind, generator),
            _entries(k, rows_t, kind, generator) / math.sqrt(k),
            _entries(k, embed_dim, kind, generator),
            _entries(k, 1, kind, generator)[:, 0] / math.sqrt(k),
        ]
        self.image_h, self.image_d, self.text_h, self.text_d, self.scale = (
            f.to(device=device, dtype=dtype) for f in factors
        )
        # Drawn last, so an end point without a logit bias gets the same factors as before it existed.
        self.bias = None
        if self.logit_bias:
            self.bias = (_entries(k, 1, kind, generator)[:, 0] / math.sqrt(k)).to(device=device, dtype=dtype)

    @property
    def dim(self) -> int:
        """Realised sketch dimension: ``sketch_dim``."""
        return int(self.scale.shape[0])

    def sketch_grads(self, grads: EndPointGrads) -> Tensor:
        """``[N, k]`` sketched gradients ``P g_i`` from the factors, in chunks of samples (no ``h (x) d`` formed)."""
        _check_bias(grads, self.bias is not None)
        dtype, k = self.scale.dtype, self.dim
        n = len(grads)
        out = torch.empty(n, k, dtype=dtype, device=self.scale.device)
        step = max(1, _CHUNK_ELEMENTS // k)
        for start in range(0, n, step):
            sl = slice(start, min(start + step, n))
            hv = _augment(grads.h_image[sl].to(dtype), grads.image_bias) @ self.image_h.T
            ht = _augment(grads.h_text[sl].to(dtype), grads.text_bias) @ self.text_h.T
            part = hv.mul_(grads.d_image[sl].to(dtype) @ self.image_d.T)
            part.addcmul_(ht, grads.d_text[sl].to(dtype) @ self.text_d.T)
            part.addcmul_(grads.scale[sl].to(dtype)[:, None], self.scale[None, :])
            if self.bias is not None:
                part.addcmul_(grads.bias[sl].to(dtype)[:, None], self.bias[None, :])
            out[sl] = part
        return out

    def sketch_direction(self, direction: EndPointDirection) -> Tensor:
        """``[k]`` sketch ``P v`` of a dense direction: ``a_j^T V b_j`` per row and block, ``((A V) * B).sum(1)``."""
        dtype = self.scale.dtype
        wv, wt = _with_bias_rows(direction, self.image_bias, self.text_bias)
        out = (
            ((self.image_h @ wv.to(dtype)) * self.image_d).sum(1)
            + ((self.text_h @ wt.to(dtype)) * self.text_d).sum(1)
            + self.scale * direction.logit_scale.to(dtype)
        )
        return out if self.bias is None else out + self.bias * direction.logit_bias.to(dtype)

    def transpose(self, z: Tensor) -> EndPointDirection:
        """``P^T z`` as a dense direction: ``A^T diag(z) B`` per block and ``c . z`` for the scale."""
        z = z.to(self.scale.dtype)
        wv = (self.image_h * z[:, None]).T @ self.image_d
        wt = (self.text_h * z[:, None]).T @ self.text_d
        out = _split_bias_rows(wv, wt, self.scale @ z, self.image_bias, self.text_bias)
        out.logit_bias = None if self.bias is None else self.bias @ z
        return out


class TensorSketch(RandomSketch):
    """The ``"tensorsketch"`` layout: count sketches of ``h`` and ``d`` multiplied in the FFT domain.

    Each block ``H (x) E`` is count-sketched into ``k`` buckets with bucket ``(beta_h(i) + beta_d(l)) mod k`` and
    sign ``sigma_h(i) sigma_d(l)`` for entry ``(i, l)``; the image block, text block, logit scale and logit bias
    (one bucket and sign each) share the buckets. ``P g`` is ``irfft(rfft(C_h h) * rfft(C_d d))`` summed over the
    blocks; :meth:`sketch_direction` and :meth:`transpose` apply the same bucket map entry-wise, so they are exact
    adjoints of it. Every column of ``P`` has one ``+-1``: ``diag(P^T P) = 1`` and ``E[P^T P] = I``.

    Args: those of :class:`RandomSketch`; ``sketch_dim`` is ``k``, the realised dimension; ``kind`` is accepted
    (and validated) for a uniform signature, the signs are always ``+-1``; the seed draws the hashes and signs,
    ``dtype`` is the signs' (and the outputs'), ``device`` the hashes' and signs'.

    Example::

        >>> sk = TensorSketch(64, 32, 16, sketch_dim=100, seed=0)
        >>> sk.dim
        100
    """

    def _draw(self, sketch_dim: int, rows_v: int, rows_t: int, embed_dim: int, kind: SketchKind,
              generator: torch.Generator, dtype: torch.dtype, device: torch.device | str) -> None:  # fmt: skip
        k = int(sketch_dim)
        self.k = k

        def draw(n: int) -> tuple[Tensor, Tensor]:
            bucket = torch.randint(0, k, (n,), generator=generator, dtype=torch.int64)
            sign = 2.0 * torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).to(torch.float64) - 1.0
            return bucket.to(device), sign.to(device=device, dtype=dtype)

        self.hashes = [draw(n) for n in (rows_v, embed_dim, rows_t, embed_dim, 1)]
        if self.logit_bias:  # drawn last: without a logit bias the hashes are the same as before it existed
            self.hashes.append(draw(1))

    @property
    def dim(self) -> int:
        """Realised sketch dimension: ``sketch_dim``."""
        return self.k

    def _count(self, x: Tensor, which: int) -> Tensor:
        bucket, sign = self.hashes[which]
        return x.new_zeros(x.shape[0], self.k).index_add_(1, bucket, x * sign)

    def _entry_map(self, which: int) -> tuple[Tensor, Tensor]:
        """``[H, e]`` buckets and signs of a block's entries."""
        (bh, sh), (bd, sd) = self.hashes[which], self.hashes[which + 1]
        return (bh[:, None] + bd[None, :]) % self.k, sh[:, None] * sd[None, :]

    def sketch_grads(self, grads: EndPointGrads) -> Tensor:
        """``[N, k]`` sketched gradients ``P g_i``: ``O(d_v + d_t + e + k log k)`` per sample."""
        _check_bias(grads, self.logit_bias)
        dtype, k = self.hashes[0][1].dtype, self.k
        n = len(grads)
        out = torch.empty(n, k, dtype=dtype, device=self.hashes[0][1].device)
        step = max(1, _CHUNK_ELEMENTS // k)
        for start in range(0, n, step):
            sl = slice(start, min(start + step, n))
            hv = self._count(_augment(grads.h_image[sl].to(dtype), grads.image_bias), 0)
            ht = self._count(_augment(grads.h_text[sl].to(dtype), grads.text_bias), 2)
            dv, dt = self._count(grads.d_image[sl].to(dtype), 1), self._count(grads.d_text[sl].to(dtype), 3)
            freq = torch.fft.rfft(hv, dim=1) * torch.fft.rfft(dv, dim=1)
            freq += torch.fft.rfft(ht, dim=1) * torch.fft.rfft(dt, dim=1)
            part = torch.fft.irfft(freq, n=k, dim=1)
            part += self._count(grads.scale[sl].to(dtype)[:, None], 4)
            if self.logit_bias:
                part += self._count(grads.bias[sl].to(dtype)[:, None], 5)
            out[sl] = part
        return out

    def sketch_direction(self, direction: EndPointDirection) -> Tensor:
        """``[k]`` sketch ``P v`` of a dense direction (each entry added into its bucket with its sign)."""
        dtype = self.hashes[0][1].dtype
        wv, wt = _with_bias_rows(direction, self.image_bias, self.text_bias)
        out = torch.zeros(self.k, dtype=dtype, device=wv.device)
        for which, w in ((0, wv), (2, wt)):
            bucket, sign = self._entry_map(which)
            out.index_add_(0, bucket.reshape(-1), (w.to(dtype) * sign).reshape(-1))
        out = out + self._count(direction.logit_scale.to(dtype).reshape(1, 1), 4)[0]
        if self.logit_bias:
            out = out + self._count(direction.logit_bias.to(dtype).reshape(1, 1), 5)[0]
        return out

    def transpose(self, z: Tensor) -> EndPointDirection:
        """``P^T z`` as a dense direction (each entry reads its bucket with its sign)."""
        z = z.to(self.hashes[0][1].dtype)
        blocks = []
        for which in (0, 2):
            bucket, sign = self._entry_map(which)
            blocks.append(z[bucket] * sign)
        (bucket, sign) = self.hashes[4]
        out = _split_bias_rows(blocks[0], blocks[1], z[bucket[0]] * sign[0], self.image_bias, self.text_bias)
        if self.logit_bias:
            (bucket, sign) = self.hashes[5]
            out.logit_bias = z[bucket[0]] * sign[0]
        return out


class EndPointSketch(RandomSketch):
    """The ``"kronecker"`` layout: a seeded sketch ``P = P_h (x) P_d`` per block, plus the logit scale (and a logit
    bias) as is.

    Kept for comparison and reproducibility of earlier rounds; :class:`KhatriRaoSketch` is the default (module
    docstring). The budget is split between the blocks and each block's ``k_h x k_d`` grid follows its aspect ratio,
    so :attr:`dim` is at most ``sketch_dim``.

    Args: those of :class:`RandomSketch`; ``sketch_dim`` is the total budget ``k``.

    Example::

        >>> sk = EndPointSketch(64, 32, 16, sketch_dim=256, seed=0)
        >>> sk.dim <= 256
        True
    """

    @staticmethod
    def _check_dim(sketch_dim: int, logit_bias: bool) -> None:
        if sketch_dim < 3 + int(logit_bias):
            raise ValueError(
                f"`sketch_dim` must be >= {3 + int(logit_bias)} (image, text, scale{' and bias' * logit_bias} "
                f"coordinates), got {sketch_dim}."
            )

    def _draw(self, sketch_dim: int, rows_v: int, rows_t: int, embed_dim: int, kind: SketchKind,
              generator: torch.Generator, dtype: torch.dtype, device: torch.device | str) -> None:  # fmt: skip
        size_v, size_t = rows_v * embed_dim, rows_t * embed_dim
        budget = sketch_dim - 1 - int(self.logit_bias)
        budget_v = max(1, round(budget * size_v / (size_v + size_t)))
        budget_t = max(1, budget - budget_v)
        kv_h, kv_d = _grid(budget_v, rows_v, embed_dim)
        kt_h, kt_d = _grid(budget_t, rows_t, embed_dim)
        factors = [
            _random_matrix(kv_h, rows_v, kind, generator),
            _random_matrix(kv_d, embed_dim, kind, generator),
            _random_matrix(kt_h, rows_t, kind, generator),
            _random_matrix(kt_d, embed_dim, kind, generator),
        ]
        self.image_h, self.image_d, self.text_h, self.text_d = (f.to(device=device, dtype=dtype) for f in factors)

    @property
    def dim(self) -> int:
        """Realised sketch dimension ``k_v + k_t + 1`` (``+ 1`` more with a logit bias)."""
        kv, kt = self.image_h.shape[0] * self.image_d.shape[0], self.text_h.shape[0] * self.text_d.shape[0]
        return kv + kt + 1 + int(self.logit_bias)

    def sketch_grads(self, grads: EndPointGrads) -> Tensor:
        """``[N, k]`` sketched gradients ``P g_i`` from the factors."""
        _check_bias(grads, self.logit_bias)
        dtype = self.image_h.dtype
        hv = _augment(grads.h_image.to(dtype), grads.image_bias) @ self.image_h.T
        dv = grads.d_image.to(dtype) @ self.image_d.T
        ht = _augment(grads.h_text.to(dtype), grads.text_bias) @ self.text_h.T
        dt = grads.d_text.to(dtype) @ self.text_d.T
        n = len(grads)
        parts = [
            (hv[:, :, None] * dv[:, None, :]).reshape(n, -1),
            (ht[:, :, None] * dt[:, None, :]).reshape(n, -1),
            grads.scale.to(dtype)[:, None],
        ]
        if self.logit_bias:
            parts.append(grads.bias.to(dtype)[:, None])
        return torch.cat(parts, dim=1)

    def sketch_direction(self, direction: EndPointDirection) -> Tensor:
        """``[k]`` sketch ``P v`` of a dense direction: ``P_h V P_d^T`` per block."""
        dtype = self.image_h.dtype
        wv, wt = _with_bias_rows(direction, self.image_bias, self.text_bias)
        parts = [
            (self.image_h @ wv.to(dtype) @ self.image_d.T).reshape(-1),
            (self.text_h @ wt.to(dtype) @ self.text_d.T).reshape(-1),
            direction.logit_scale.to(dtype).reshape(1),
        ]
        if self.logit_bias:
            parts.append(direction.logit_bias.to(dtype).reshape(1))
        return torch.cat(parts)

    def transpose(self, z: Tensor) -> EndPointDirection:
        """``P^T z`` as a dense direction: ``P_h^T Z P_d`` per block."""
        kv = self.image_h.shape[0] * self.image_d.shape[0]
        kt = self.text_h.shape[0] * self.text_d.shape[0]
        zv = z[:kv].reshape(self.image_h.shape[0], self.image_d.shape[0])
        zt = z[kv : kv + kt].reshape(self.text_h.shape[0], self.text_d.shape[0])
        wv = self.image_h.T @ zv @ self.image_d
        wt = self.text_h.T @ zt @ self.text_d
        out = _split_bias_rows(wv, wt, z[kv + kt], self.image_bias, self.text_bias)
        out.logit_bias = z[kv + kt + 1] if self.logit_bias else None
        return out


class IdentitySketch:
    """The exact path (no sketch): ``P = I`` on the flattened theta-space."""

    def __init__(
        self, image_dim: int, text_dim: int, embed_dim: int, *, image_bias: bool, text_bias: bool,
        logit_bias: bool = False,
    ) -> None:  # fmt: skip
        self.shapes = (image_dim, text_dim, embed_dim)
        self.image_bias, self.text_bias, self.logit_bias = image_bias, text_bias, logit_bias

    @property
    def dim(self) -> int:
        d_v, d_t, e = self.shapes
        return d_v * e + d_t * e + 1 + e * (int(self.image_bias) + int(self.text_bias)) + int(self.logit_bias)

    def sketch_grads(self, grads: EndPointGrads) -> Tensor:
        _check_bias(grads, self.logit_bias)
        return grads.flatten()

    def sketch_direction(self, direction: EndPointDirection) -> Tensor:
        return direction.flatten()

    def transpose(self, z: Tensor) -> EndPointDirection:
        d_v, d_t, e = self.shapes
        wv, z = z[: d_v * e].reshape(d_v, e), z[d_v * e :]
        wt, z = z[: d_t * e].reshape(d_t, e), z[d_t * e :]
        scale, z = z[0], z[1:]
        image_bias = text_bias = logit_bias = None
        if self.image_bias:
            image_bias, z = z[:e], z[e:]
        if self.text_bias:
            text_bias, z = z[:e], z[e:]
        if self.logit_bias:
            logit_bias = z[0]
        return EndPointDirection(wv, wt, scale, image_bias, text_bias, logit_bias)


KroneckerSketch = EndPointSketch
"""The ``"kronecker"`` layout under its descriptive name."""

Sketch = KhatriRaoSketch | TensorSketch | EndPointSketch | IdentitySketch


def make_sketch(
    image_dim: int, text_dim: int, embed_dim: int, *, sketch_dim: int | None, image_bias: bool = False,
    text_bias: bool = False, logit_bias: bool = False, kind: SketchKind = "gaussian", seed: int = 0,
    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu", exact_when_small: bool = True,
    layout: SketchLayout = "khatri_rao",
) -> Sketch:  # fmt: skip
    """A JL sketch of theta-space in the given ``layout``, or the identity when ``sketch_dim`` is None or (with
    ``exact_when_small``) ``dim(theta) <= sketch_dim``.

    Args:
        image_dim: ``d_v``.
        text_dim: ``d_t``.
        embed_dim: ``e``.
        sketch_dim: ``k``; ``None`` = the identity (exact).
        image_bias: the end point has an image bias.
        text_bias: the end point has a text bias.
        logit_bias: the end point has SigLIP's logit bias (one more scalar coordinate).
        kind: ``"gaussian"`` or ``"rademacher"`` entries (``"tensorsketch"``: always signs).
        seed: seed of the CPU generator that draws the sketch.
        dtype: dtype of the sketch when applied.
        device: device of the sketch when applied.
        exact_when_small: return the identity when ``dim(theta) <= sketch_dim``.
        layout: ``"khatri_rao"`` (default; realised dimension ``sketch_dim``), ``"kronecker"`` (the earlier
            layout; at most ``sketch_dim``) or ``"tensorsketch"`` (module docstring).

    Example::

        >>> make_sketch(1280, 384, 128, sketch_dim=512).dim
        512
        >>> make_sketch(1280, 384, 128, sketch_dim=512, layout="kronecker").dim
        493
        >>> type(make_sketch(8, 4, 2, sketch_dim=512)).__name__
        'IdentitySketch'
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown sketch layout {layout!r}; use one of {LAYOUTS}.")
    exact = IdentitySketch(image_dim, text_dim, embed_dim, image_bias=image_bias, text_bias=text_bias,
                           logit_bias=logit_bias)  # fmt: skip
    if sketch_dim is None or (exact_when_small and exact.dim <= sketch_dim):
        return exact
    cls = {"khatri_rao": KhatriRaoSketch, "kronecker": EndPointSketch, "tensorsketch": TensorSketch}[layout]
    return cls(
        image_dim, text_dim, embed_dim, sketch_dim=sketch_dim, image_bias=image_bias, text_bias=text_bias,
        logit_bias=logit_bias, kind=kind, seed=seed, dtype=dtype, device=device,
    )  # fmt: skip
