"""Full-parameter Dot, TracIn and TRAK for small models (docs/methods.md, full-parameter Dot / TracIn / TRAK).

One module because it is one computation: per-sample gradients of the bank loss through both towers (``vmap(grad)``
over chunks), their seeded projection, and the three scores built on them.

The end-point functions (:mod:`lightning_chips.functional.influence`) differentiate the per-sample bank loss
w.r.t. ``theta = (W_v, W_t, logit_scale)`` only, in closed form from cached features. This module
differentiates *the same loss* w.r.t. any set of trainable parameters of the model -- all of them, or a
subset chosen by name prefix, e.g. the last tower blocks plus the end point -- with ``torch.func``:

.. math::

    \\ell(z_i; \\theta) = \\tfrac12 [\\operatorname{lse}(a) - a_0] + \\tfrac12 [\\operatorname{lse}(b) - b_0],
    \\quad a = s\\,[x_i \\cdot y_i,\\ x_i \\cdot Y_B], \\quad b = s\\,[x_i \\cdot y_i,\\ X_B \\cdot y_i],

with ``x_i = normalize(W_v^T f_v(image_i; theta))``, ``y_i = normalize(W_t^T f_t(tokens_i; theta))`` computed
through the towers (SigLIP's sigmoid loss instead when the adapter's end point has a logit bias: :mod:`.bank`),
and the bank ``(X_B, Y_B)`` embedded once with the current weights and held constant
(:func:`full_parameter_bank`; each pool pair is excluded from its own negatives by id). Per-sample gradients
``g_i = d ell(z_i) / d theta`` come from ``vmap(grad(ell))`` over chunks of ``chunk_size`` pairs
(:func:`full_parameter_grads`). Scores, with ``u = mean_t g_t`` over the target pairs:

* **Dot**: ``g(z)^T u``;
* **TracIn** (Pruthi et al. 2020): ``sum_c eta_c g_c(z)^T u_c`` over checkpoints;
* **TRAK** (Park et al. 2023): ``phi(z)^T (Phi^T Phi + lambda I)^{-1} phi_u * (1 - p_corr(z))`` with
  ``phi = P g`` over ``train_samples`` pool pairs, an ensemble averaging the kernel scores and the ``Q`` terms.

With an optional seeded JL projection ``P`` (``sketch_dim = k``; Gaussian ``N(0, 1/k)`` or Rademacher
``+-1/sqrt(k)`` entries, generated block by block from the seed so the same ``P`` applies to every chunk) Dot
and TracIn become ``(P g)^T (P u)``. When only the end-point parameters require grad, these are exactly the
end-point scores (tested to 1e-10 in float64).

Cost: one forward and one backward through the towers per pair (vs one forward for the end point), and a
``chunk_size x D`` block of gradients in memory (``D`` = number of selected parameters); a projection adds
``O(D k)`` per chunk. TRAK keeps ``train_samples x k`` projected gradients and solves in ``min(k,
train_samples)`` dimensions. Meant for small models and for measuring the end-point approximation's fidelity;
the streaming scorers stay in the end-point subspace.

Example::

    >>> import open_clip, torch
    >>> from lightning_chips.functional import endpoint_parameter_names, full_parameter_influence
    >>> model = open_clip.create_model("RN50").double()  # doctest: +SKIP
    >>> # the end point plus the last image block
    >>> params = [*endpoint_parameter_names(model), "visual.layer4.2"]  # doctest: +SKIP
    >>> scores = full_parameter_influence(model, pool_images, pool_tokens, target_images, target_tokens,
    ...                                   method="dot", params=params)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_chips.adapters import CLIPAdapter, resolve_adapter
from lightning_chips.functional.bank import NegativeBank, bank_stats
from lightning_chips.functional.linalg import damped_cholesky_solve
from lightning_chips.functional.rounds import subsample
from lightning_chips.functional.sketch import SketchKind

__all__ = [
    "GradientProjection",
    "endpoint_parameter_names",
    "full_parameter_bank",
    "full_parameter_grads",
    "full_parameter_influence",
    "select_parameters",
]

ModelLike = nn.Module | CLIPAdapter
Params = str | Sequence[str] | None
FullMethod = Literal["dot", "tracin", "trak"]

_CACHE_LIMIT = 1 << 24  # largest D x k projection kept in memory instead of being regenerated per chunk


# -- parameters ------------------------------------------------------------------------------------------------------


def select_parameters(model: ModelLike, params: Params = None) -> dict[str, Tensor]:
    """The parameters to differentiate, by name, in ``named_parameters`` order of the adapter's module.

    Args:
        model: an open_clip CLIP, a module holding one, a :class:`~lightning_chips.adapters.SupportsEndPoint`
            module or an adapter; names are relative to :attr:`CLIPAdapter.module` (for
            :class:`~lightning_chips.models.OpenCLIPModule` that is the open_clip model: ``"visual.proj"``).
        params: ``None`` = every parameter with ``requires_grad``; otherwise a name or a list of names, each
            selecting the parameter of that name or every parameter under that prefix (``"visual.transformer"``
            selects ``visual.transformer.resblocks.0.ln_1.weight``, ...), whatever its ``requires_grad``.

    Raises:
        ValueError: when a name matches no parameter, or nothing is selected.

    Example::

        >>> import open_clip
        >>> cfg = {"embed_dim": 8, "vision_cfg": {"image_size": 8, "layers": 1, "width": 16, "head_width": 8,
        ...        "patch_size": 4}, "text_cfg": {"context_length": 6, "vocab_size": 20, "width": 16,
        ...        "heads": 2, "layers": 1}}
        >>> list(select_parameters(open_clip.CLIP(**cfg), ["visual.proj", "logit_scale"]))
        ['logit_scale', 'visual.proj']
    """
    module = resolve_adapter(model).module
    named = dict(module.named_parameters())
    if params is None:
        chosen = {name: p for name, p in named.items() if p.requires_grad}
        if not chosen:
            raise ValueError("No parameter of the model requires grad; pass `params` (names or name prefixes).")
        return chosen
    prefixes = [params] if isinstance(params, str) else list(params)
    chosen_names: set[str] = set()
    for prefix in prefixes:
        stem = prefix.rstrip(".")
        hits = {name for name in named if name == stem or name.startswith(stem + ".")}
        if not hits:
            top = sorted({name.split(".")[0] for name in named})
            raise ValueError(
                f"`params` entry {prefix!r} matches no parameter of {type(module).__name__}; names are relative to "
                f"the CLIP module and start with one of {top}."
            )
        chosen_names |= hits
    return {name: p for name, p in named.items() if name in chosen_names}


def endpoint_parameter_names(model: ModelLike) -> list[str]:
    """Names of the parameters that hold the end point (projection heads, their biases, ``logit_scale``, a SigLIP
    ``logit_bias``).

    Found by storage, not by name, so views (ModifiedResNet's ``c_proj.weight`` transposed) resolve too; pass
    them with other prefixes to :func:`full_parameter_grads` (``[*endpoint_parameter_names(m), "visual.layer4"]``).

    Example::

        >>> import open_clip
        >>> cfg = {"embed_dim": 8, "vision_cfg": {"image_size": 8, "layers": 1, "width": 16, "head_width": 8,
        ...        "patch_size": 4}, "text_cfg": {"context_length": 6, "vocab_size": 20, "width": 16,
        ...        "heads": 2, "layers": 1}}
        >>> endpoint_parameter_names(open_clip.CLIP(**cfg))
        ['text_projection', 'logit_scale', 'visual.proj']
    """
    adapter = resolve_adapter(model)
    pointers = {t.data_ptr() for t in adapter.endpoint().tensors()}
    return [name for name, p in adapter.module.named_parameters() if p.data_ptr() in pointers]


# -- the per-sample loss through the towers --------------------------------------------------------------------------


class _BankLoss(nn.Module):
    """The bank loss of a batch as a module around the CLIP, so ``functional_call`` can substitute parameters.

    The adapter reads the model's attributes at call time, so substituting ``clip.<name>`` reaches both the
    towers and the end point.
    """

    def __init__(self, adapter: CLIPAdapter) -> None:
        super().__init__()
        self.clip = adapter.module
        object.__setattr__(self, "_adapter", adapter)  # not a submodule: its module is registered above

    def forward(self, images: Tensor, tokens: Tensor, bank: NegativeBank, exclude: Tensor | None):
        adapter: CLIPAdapter = self._adapter
        stats = bank_stats(adapter.image_features(images), adapter.text_features(tokens), adapter.endpoint(),
                           bank.image, bank.text, exclude=exclude)  # fmt: skip
        return stats.loss, 1.0 - stats.p_corr()


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, frozen batch-norm statistics) for the duration, restoring every submodule's flag."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype())


def full_parameter_bank(
    model: ModelLike,
    images: Tensor,
    tokens: Tensor,
    ids: Tensor | None = None,
    *,
    bank_size: int = 1024,
    seed: int = 0,
    batch_size: int = 256,
) -> NegativeBank:
    """The negative bank of a round: ``bank_size`` pool pairs drawn with ``seed``, embedded with the current weights.

    The same pairs as :func:`~lightning_chips.functional.bank.make_bank` over the pool's features, so
    full-parameter and end-point scores share their loss.
    """
    adapter = resolve_adapter(model)
    module = adapter.module
    ids = torch.arange(len(images), device=images.device) if ids is None else ids.to(images.device)
    idx = subsample(len(images), bank_size, seed, images.device)
    ep = adapter.endpoint()
    parts_x, parts_y = [], []
    with torch.no_grad(), _eval_mode(module):
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            parts_x.append(ep.embed_image(adapter.image_features(images[chunk].to(_dtype(module)))))
            parts_y.append(ep.embed_text(adapter.text_features(adapter.trim_tokens(tokens[chunk]))))
    return NegativeBank(torch.cat(parts_x), torch.cat(parts_y), ids[idx])


# -- projections -----------------------------------------------------------------------------------------------------


class GradientProjection:
    """A seeded JL projection ``P`` (``k x D``) applied to chunks of dense gradients, ``phi = g P^T``.

    Entries are i.i.d. ``N(0, 1/k)`` (``"gaussian"``) or ``+-1/sqrt(k)`` (``"rademacher"``), so
    ``E[P^T P] = I``. ``P^T`` is generated in row blocks of ``block_size`` parameters, block ``b`` from
    ``torch.Generator().manual_seed(seed * 1_000_003 + b)`` on the CPU: the same ``P`` on every device, for every
    chunk and chunk size. It is cached when ``D k <= 2^24`` and regenerated block by block otherwise (memory
    ``O(block_size k)``).

    Example::

        >>> proj = GradientProjection(10_000, 64, seed=0)
        >>> g = torch.randn(3, 10_000, dtype=torch.float64)
        >>> torch.equal(proj(g), torch.cat([proj(g[:1]), proj(g[1:])]))
        True
    """

    def __init__(
        self, dim: int, sketch_dim: int, *, kind: SketchKind = "gaussian", seed: int = 0, block_size: int = 65536
    ) -> None:
        if sketch_dim < 1:
            raise ValueError(f"`sketch_dim` must be >= 1, got {sketch_dim}.")
        if kind not in ("gaussian", "rademacher"):
            raise ValueError(f"Unknown projection kind {kind!r}; use 'gaussian' or 'rademacher'.")
        self.dim, self.sketch_dim, self.kind, self.seed, self.block_size = dim, sketch_dim, kind, seed, block_size
        self._cache: Tensor | None = None

    def _block(self, b: int) -> Tensor:
        rows = min(self.block_size, self.dim - b * self.block_size)
        generator = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + b)
        if self.kind == "gaussian":
            block = torch.randn(rows, self.sketch_dim, generator=generator, dtype=torch.float64)
        else:
            block = 2.0 * torch.randint(0, 2, (rows, self.sketch_dim), generator=generator).to(torch.float64) - 1.0
        return block / math.sqrt(self.sketch_dim)

    def __call__(self, grads: Tensor) -> Tensor:
        """``[c, D] -> [c, k]``."""
        if grads.shape[-1] != self.dim:
            raise ValueError(f"Gradients have {grads.shape[-1]} coordinates, the projection expects {self.dim}.")
        blocks = range(math.ceil(self.dim / self.block_size))
        if self.dim * self.sketch_dim <= _CACHE_LIMIT:
            if self._cache is None:
                self._cache = torch.cat([self._block(b) for b in blocks])
            return grads @ self._cache.to(grads.device, grads.dtype)
        out = grads.new_zeros(grads.shape[0], self.sketch_dim)
        for b in blocks:
            lo = b * self.block_size
            out += grads[:, lo : lo + self.block_size] @ self._block(b).to(grads.device, grads.dtype)
        return out


# -- per-sample gradients --------------------------------------------------------------------------------------------


def _iter_grads(
    adapter: CLIPAdapter,
    images: Tensor,
    tokens: Tensor,
    bank: NegativeBank,
    ids: Tensor | None,
    selected: dict[str, Tensor],
    projection: GradientProjection | None,
    chunk_size: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(g, Q)`` per chunk: ``[c, D]`` (or ``[c, k]`` projected) flattened gradients and ``Q = 1 - p_corr``."""
    module = adapter.module
    loss_module = _BankLoss(adapter)
    names = list(selected)
    primals = {"clip." + name: p.detach() for name, p in selected.items()}
    # The other parameters enter as detached constants: inside grad() autograd is on, and a parameter that still
    # requires grad would record a graph nobody reads.
    frozen = {"clip." + name: p.detach() for name, p in module.named_parameters() if name not in selected}

    def one(params: dict[str, Tensor], image: Tensor, token: Tensor, exclude: Tensor | None):
        ex = None if exclude is None else exclude[None]
        loss, q = functional_call(loss_module, (params, frozen), (image[None], token[None], bank, ex))
        return loss[0], q[0]

    per_sample = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0, None if ids is None else 0))
    dtype = _dtype(module)
    with torch.no_grad(), _eval_mode(module):
        for start in range(0, len(images), chunk_size):
            sl = slice(start, start + chunk_size)
            exclude = None if ids is None else bank.exclusion(ids[sl])
            with warnings.catch_warnings():
                # vmap loops over fused attention kernels and says so on every call; the result is exact.
                warnings.filterwarnings("ignore", message="There is a performance drop")
                grads, q = per_sample(primals, images[sl].to(dtype), adapter.trim_tokens(tokens[sl]), exclude)
            flat = torch.cat([grads["clip." + name].reshape(q.shape[0], -1) for name in names], dim=1)
            yield (flat if projection is None else projection(flat)), q


def full_parameter_grads(
    model: ModelLike,
    images: Tensor,
    tokens: Tensor,
    bank: NegativeBank,
    ids: Tensor | None = None,
    *,
    params: Params = None,
    sketch_dim: int | None = None,
    sketch: SketchKind = "gaussian",
    seed: int = 0,
    chunk_size: int = 16,
) -> Tensor:
    """Per-sample gradients ``d ell(z_i) / d theta`` of the bank loss w.r.t. the selected parameters.

    Args:
        model: the CLIP (anything :func:`~lightning_chips.adapters.resolve_adapter` accepts). It is run in eval
            mode and in its own dtype (use ``model.double()`` for float64 gradients); its flags are restored.
        images: ``[N, 3, H, W]`` preprocessed images.
        tokens: ``[N, L]`` token ids.
        bank: the constant negatives (:func:`full_parameter_bank`).
        ids: pool ids of the pairs (bank members are dropped from their own negatives); ``None`` for non-pool
            pairs such as the target set.
        params: parameter names or name prefixes (:func:`select_parameters`); ``None`` = all with
            ``requires_grad``.
        sketch_dim: project to ``k`` dimensions with a seeded :class:`GradientProjection`; ``None`` = dense.
        sketch: ``"gaussian"`` or ``"rademacher"``.
        seed: projection seed.
        chunk_size: pairs per ``vmap`` call (memory: ``chunk_size x D`` gradients plus the activations).

    Returns:
        ``[N, D]`` gradients, parameters concatenated in :func:`select_parameters` order and each flattened
        row-major (``[N, k]`` projected).

    Example::

        >>> import open_clip, torch
        >>> cfg = {"embed_dim": 8, "vision_cfg": {"image_size": 8, "layers": 1, "width": 16, "head_width": 8,
        ...        "patch_size": 4}, "text_cfg": {"context_length": 6, "vocab_size": 20, "width": 16,
        ...        "heads": 2, "layers": 1}}
        >>> model = open_clip.CLIP(**cfg).double()
        >>> images, tokens = torch.randn(5, 3, 8, 8), torch.randint(1, 20, (5, 6))
        >>> bank = full_parameter_bank(model, images, tokens, bank_size=4)
        >>> full_parameter_grads(model, images, tokens, bank, torch.arange(5), params="visual.proj").shape
        torch.Size([5, 128])
    """
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
    adapter = resolve_adapter(model)
    selected = select_parameters(adapter, params)
    projection = _projection(selected, sketch_dim, sketch, seed)
    ids = None if ids is None else ids.to(images.device)
    parts = [g for g, _ in _iter_grads(adapter, images, tokens, bank, ids, selected, projection, chunk_size)]
    return torch.cat(parts)


def _projection(selected: dict[str, Tensor], sketch_dim: int | None, kind: SketchKind, seed: int):
    if sketch_dim is None:
        return None
    return GradientProjection(sum(p.numel() for p in selected.values()), sketch_dim, kind=kind, seed=seed)


# -- influence -------------------------------------------------------------------------------------------------------


def _solve(matrix: Tensor, rhs: Tensor, lam: float) -> tuple[Tensor, float]:
    """``(matrix + lam I)^{-1} rhs`` for a PSD ``matrix`` and ``[k, T]`` ``rhs``; a matrix that does not factorise
    is solved with more damping and a warning (:func:`lightning_chips.functional.linalg.damped_cholesky_solve`)."""
    return damped_cholesky_solve(matrix, rhs, lam, "kernel", "TRAK")


def _trak_direction(phi: Tensor, phi_u: Tensor, damping: float | None) -> Tensor:
    """``(Phi^T Phi + lambda I)^{-1} phi_u`` (``[k, T]``), in ``k`` or, by Woodbury, ``n = len(Phi)`` dimensions.

    ``lambda = damping`` or ``1e-3 * trace(Phi^T Phi) / k`` (the end-point rule).
    """
    n, k = phi.shape
    if damping is not None and damping <= 0:
        raise ValueError(f"TRAK's `damping` must be > 0 or None (the relative rule), got {damping}.")
    lam = damping if damping is not None else 1e-3 * float(phi.square().sum()) / k
    if k <= n:
        return _solve(phi.T @ phi, phi_u, lam)[0]
    z, lam = _solve(phi @ phi.T, phi @ phi_u, lam)
    return (phi_u - phi.T @ z) / lam


def full_parameter_influence(
    model: ModelLike | Sequence[ModelLike],
    pool_images: Tensor,
    pool_tokens: Tensor,
    target_images: Tensor,
    target_tokens: Tensor,
    *,
    method: FullMethod = "dot",
    learning_rates: Sequence[float] | None = None,
    params: Params = None,
    pool_ids: Tensor | None = None,
    per_target: bool = False,
    sketch_dim: int | None = None,
    sketch: SketchKind = "gaussian",
    damping: float | None = None,
    bank_size: int = 1024,
    train_samples: int = 8192,
    seed: int = 0,
    chunk_size: int = 16,
) -> Tensor:
    """Dot, TracIn or TRAK of every pool pair with full-parameter (or parameter-subset) gradients.

    The same quantities as :func:`~lightning_chips.functional.influence.grad_dot`,
    :func:`~lightning_chips.functional.influence.tracin_scores` and
    :func:`~lightning_chips.functional.influence.trak_scores` with the same bank (``bank_size`` pool pairs drawn
    with ``seed``), the same TRAK training sample (``train_samples`` pool pairs drawn with ``seed + 1``) and the
    same damping rule, but with gradients through the towers (see the module docstring for the formulas):

    * ``"dot"``: ``g(z)^T u`` with one model;
    * ``"tracin"``: ``sum_c eta_c g_c(z)^T u_c`` over ``model = [checkpoint_c, ...]`` with
      ``learning_rates = [eta_c, ...]`` (default 1 each);
    * ``"trak"``: ``phi(z)^T (Phi^T Phi + lambda I)^{-1} phi_u * (1 - p_corr(z))``, averaged over an ensemble
      ``model = [checkpoint_c, ...]`` as (mean kernel) x (mean ``Q``).

    With ``sketch_dim`` gradients are projected first (:class:`GradientProjection`, seed ``seed + 3``); without it
    TRAK's identity projection solves in ``min(D, train_samples)`` dimensions.

    Args:
        model: one CLIP, or a list of checkpoints (TracIn, TRAK ensembles).
        pool_images: ``[N, 3, H, W]``.
        pool_tokens: ``[N, L]``.
        target_images: ``[T, 3, H, W]`` target-domain pairs (``u`` is their mean gradient).
        target_tokens: ``[T, L]``.
        method: ``"dot"``, ``"tracin"`` or ``"trak"``.
        learning_rates: TracIn's ``eta_c``, one per checkpoint.
        params: parameter names or prefixes (:func:`select_parameters`); ``None`` = all with ``requires_grad``.
        pool_ids: pool ids (``arange(N)`` when None), used to exclude bank members from their own negatives.
        per_target: return the ``[N, T]`` scores against each target pair instead of their mean.
        sketch_dim: JL projection dimension ``k``; ``None`` = exact.
        sketch: ``"gaussian"`` or ``"rademacher"``.
        damping: TRAK's ``lambda``; ``None`` = ``1e-3 * trace(Phi^T Phi) / k``.
        bank_size: negatives per sample.
        train_samples: pool pairs in TRAK's kernel.
        seed: seed of the bank, the TRAK sample and the projection.
        chunk_size: pairs per ``vmap`` call.

    Returns:
        ``[N]`` scores, or ``[N, T]`` with ``per_target=True`` (float64 when the model is).

    Raises:
        ValueError: for an unknown method, an empty target set, several models with ``"dot"``, or learning rates
            that do not match the checkpoints.
    """
    if method not in ("dot", "tracin", "trak"):
        raise ValueError(f"Unknown influence method {method!r}; use 'dot', 'tracin' or 'trak'.")
    if len(target_images) == 0:
        raise ValueError(f"{method}: the target set is empty; pass at least one target pair.")
    models = list(model) if isinstance(model, Sequence) else [model]
    if not models:
        raise ValueError(f"{method} needs at least one model checkpoint.")
    if method == "dot" and len(models) > 1:
        raise ValueError("Dot takes one model; use method='tracin' (learning-rate weighted) for checkpoints.")
    if learning_rates is not None and (method != "tracin" or len(learning_rates) != len(models)):
        raise ValueError(
            f"`learning_rates` are TracIn's, one per checkpoint: got {len(learning_rates)} for {len(models)} "
            f"checkpoint(s) with method={method!r}."
        )
    rates = [1.0] * len(models) if learning_rates is None else [float(lr) for lr in learning_rates]
    pool_ids = torch.arange(len(pool_images), device=pool_images.device) if pool_ids is None else pool_ids
    total_kernel, total_q = None, None
    for m, lr in zip(models, rates, strict=True):
        kernel, q = _one_checkpoint(
            resolve_adapter(m), pool_images, pool_tokens, target_images, target_tokens, pool_ids.to(pool_images.device),
            method=method, params=params, per_target=per_target, sketch_dim=sketch_dim, sketch=sketch,
            damping=damping, bank_size=bank_size, train_samples=train_samples, seed=seed, chunk_size=chunk_size,
        )  # fmt: skip
        kernel = lr * kernel if method == "tracin" else kernel
        total_kernel = kernel if total_kernel is None else total_kernel + kernel
        total_q = q if total_q is None else total_q + q
    if method != "trak":
        return total_kernel
    n = len(models)
    q = total_q / n
    return (total_kernel / n) * (q[:, None] if per_target else q)


def _one_checkpoint(
    adapter: CLIPAdapter,
    pool_images: Tensor,
    pool_tokens: Tensor,
    target_images: Tensor,
    target_tokens: Tensor,
    pool_ids: Tensor,
    *,
    method: FullMethod,
    params: Params,
    per_target: bool,
    sketch_dim: int | None,
    sketch: SketchKind,
    damping: float | None,
    bank_size: int,
    train_samples: int,
    seed: int,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """``(kernel, Q)`` of the pool at one checkpoint: ``g . u`` (or ``phi . v`` for TRAK) and ``1 - p_corr``."""
    selected = select_parameters(adapter, params)
    projection = _projection(selected, sketch_dim, sketch, seed + 3)
    bank = full_parameter_bank(adapter, pool_images, pool_tokens, pool_ids, bank_size=bank_size, seed=seed)

    def stream(images: Tensor, tokens: Tensor, ids: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
        return _iter_grads(adapter, images, tokens, bank, ids, selected, projection, chunk_size)

    target = torch.cat([g for g, _ in stream(target_images, target_tokens, None)])  # [T, D]
    direction = target.T if per_target else target.mean(0, keepdim=True).T  # [D, T] or [D, 1]
    if method == "trak":
        idx = subsample(len(pool_images), train_samples, seed + 1, pool_images.device)
        phi = torch.cat([g for g, _ in stream(pool_images[idx], pool_tokens[idx], pool_ids[idx])])
        direction = _trak_direction(phi, direction, damping)
    kernels, qs = [], []
    for g, q in stream(pool_images, pool_tokens, pool_ids):
        kernels.append(g @ direction)
        qs.append(q)
    kernel = torch.cat(kernels)
    return (kernel if per_target else kernel[:, 0]), torch.cat(qs)
