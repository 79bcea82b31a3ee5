"""CHIPS utility (Zhuang et al., CVPR 2026; docs/methods.md, CHIPS) as pure tensor math.

One module because it is one computation: the settings, the round's preparation (bank, target gradient, curvature
atoms of either loss (:mod:`.curvature`), solve, plausibility reference) and the per-batch scores that read it.

.. math::

    U(z) = A(z)\\, w_L(z)\\, w_R(z), \\qquad A(z) = g(z)^\\top M^{-1} u, \\qquad
    M = (1 - \\alpha)\\,\\Phi_{pos} + \\alpha\\,\\Phi_{neg} + \\lambda I

* ``g(z)``: the closed-form end-point gradient of the per-sample bank loss (:mod:`.bank`).
* ``u``: the mean bank-loss gradient over the target pairs (the pool bank as negatives).
* ``Phi_pos = (1/R) sum_r g_r g_r^T`` over ``R`` seeded curvature samples of the pool (empirical Fisher).
* ``Phi_neg`` **[ours]**: the Gauss-Newton term of the InfoNCE softmax. For the image->text logits
  ``a_j = s x . c_j`` (``c_0 = y``, ``c_j`` the bank texts) of sample ``r`` with ``p = softmax(a)`` the loss
  Hessian w.r.t. the logits is ``diag(p) - p p^T``, so the GGN is
  ``J^T (diag p - p p^T) J = sum_j p_j (J_j - Jbar)(J_j - Jbar)^T`` with ``J_j = d a_j / d theta`` and
  ``Jbar = sum_j p_j J_j``: the covariance of logit gradients under the softmax, dominated by the hard
  negatives. ``Phi_neg`` is the average over samples of half the image->text plus half the text->image GGN. It
  is estimated without bias by drawing ``K = negatives_per_sample`` indices ``j ~ p`` per sample and direction:
  each draw is an *atom* ``J_j - Jbar`` with weight ``1 / (2 K R)``. Every atom keeps the rank-one structure of
  a gradient (``J_j`` for the image head is ``h_v (x) s (I - x x^T) c_j / ||e_v||``; only ``c_0`` touches the text
  head), so atoms are :class:`~lightning_chips.functional.gradients.EndPointGrads` like the gradients. ``M`` is a
  positive combination of PSD terms plus ``lambda I``: positive definite.
* SigLIP's sigmoid loss (an end point with a logit bias; docs/methods.md, SigLIP's sigmoid loss): every logit is a
  Bernoulli term of its own with output Hessian ``v(z) = sigma(z)(1 - sigma(z))`` and no softmax coupling, so the
  GGN of ``l_i`` is ``v(z_0) J_0 J_0^T + 1/2 sum_j v(a_j) J_{a_j} J_{a_j}^T + 1/2 sum_j v(b_j) J_{b_j} J_{b_j}^T``.
  ``Phi_pos`` is its positive-logit term, exact (one atom ``J_0`` per sample, weight ``(1 - alpha) v(z_0) / R``);
  ``Phi_neg`` its bank-logit terms, importance-sampled: ``K`` draws per sample and direction with ``j ~ v_j / V``,
  ``V = sum_j v_j``, each an atom ``J_j`` (only the drawing head's block, the scale ``z - beta_l`` and the logit
  bias 1) of weight ``alpha V / (2 K R)``, unbiased for the sum over the bank. Same atom count and form, so both
  solvers run unchanged; at ``alpha = 1/2``, ``M = GGN / 2 + lambda I``.
* ``lambda``: given as ``damping``, or ``rho * trace(M_0) / k`` with ``rho = relative_damping`` (default
  ``1e-3``), ``M_0 = M - lambda I`` and ``k`` the dimension the solve runs in. It is a theta-space quantity:
  ``rho`` times the mean eigenvalue of the curvature. In the sketch, ``P P^T ~ (dim(theta) / k) I``, so
  ``P (M_0 + lambda_theta I) P^T ~ P M_0 P^T + lambda_theta (dim(theta) / k) I``, and ``rho trace(P M_0 P^T) / k``
  is the same relative damping as ``rho trace(M_0) / dim(theta)`` for the exact solve: one ``rho`` means the same
  regularisation for every solver. ``rho -> infinity`` turns the Newton alignment into the plain dot ``g . u``.
* ``w_L = (1 - p_corr)(1 + sigmoid(-m))`` (:meth:`BankStats.learnability`; ``p_corr = sigma(z_ii)`` for the sigmoid
  loss).
* ``w_R = sigmoid((1 - beta) cos(x, mu_x) + beta cos(y, mu_y))`` with ``mu`` the mean target embeddings.
* ``w_P`` **[ours, beyond the paper; on in** :class:`~lightning_chips.scoring.CHIPS` **by default, off in the
  functional forms]**: the plausibility weight ``max(pi_theta(z), pi_ref(z))^gamma`` (:mod:`.plausibility`), the
  bank rank of the pair's true partner under the model and under a reference adapted to the target set, with
  ``gamma`` scaled by the pool's estimated noise share (``noise_adaptive``): it stops the utility from rewarding
  mismatched and uninformative captions, which the paper's product ranks high, and leaves a clean pool's
  utility as the paper's.

Three solvers produce the same object, a dense direction ``v = M^{-1} u`` in theta-space, so that scoring a
pool pair costs one factored inner product ``g . v = h_v^T V_v d_v + h_t^T V_t d_t + g_s v_s``:

* ``"sketch"`` (the paper): ``v = P^T (P M P^T)^{-1} P u`` with a seeded JL sketch ``P`` of theta-space
  (:mod:`.sketch`; by default each row is a random rank-one direction per head, so the realised dimension is
  ``sketch_dim``); ``P g`` is never needed for the pool. With ``sketch_dim=None`` or ``dim(theta) <= sketch_dim``
  it is the exact dense solve. With ``k`` below the number of curvature atoms, ``P M P^T`` has no null space, so
  the sketch cannot reproduce the ``1 / lambda`` weight the exact solve gives to the part of ``u`` outside the
  atoms' span: it is a regularised, subspace-restricted Newton step, not an estimate of the exact one
  (docs/benchmarks/sketch_fidelity.md measures how far apart they rank the pool).
* ``"kernel"`` (exact, beyond the paper): with atoms ``a_r`` and weights ``w_r``, ``M = lambda I + A^T W A`` and
  Woodbury gives ``v = (u - A^T W^{1/2} (lambda I + W^{1/2} A A^T W^{1/2})^{-1} W^{1/2} A u) / lambda`` from
  the ``R x R`` Gram matrix of the atoms (factored inner products, no JL error).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_chips.endpoint import EndPoint
from lightning_chips.functional.bank import NegativeBank, grads_from_stats, make_bank
from lightning_chips.functional.curvature import curvature_atoms
from lightning_chips.functional.gradients import EndPointDirection
from lightning_chips.functional.linalg import Solver, solve_direction
from lightning_chips.functional.plausibility import (
    NoiseEstimate,
    adapt_endpoint,
    adaptive_power,
    bank_rank,
    estimate_noise_share,
    plausibility_weight,
)
from lightning_chips.functional.rounds import round_inputs, subsample
from lightning_chips.functional.sketch import SketchKind, SketchLayout
from lightning_chips.functional.target_share import TargetShare, adaptive_alpha, estimate_target_share

__all__ = [
    "ALL_COMPONENTS",
    "COMPONENTS",
    "ChipsArguments",
    "ChipsScores",
    "ChipsState",
    "chips_prepare",
    "chips_score_batch",
    "chips_scores",
    "curvature_atoms",
    "solve_direction",
]

COMPONENTS = ("alignment", "learnability", "relevance")
"""The paper's utility factors (the default ``components``)."""
ALL_COMPONENTS = (*COMPONENTS, "plausibility")
"""Every factor ``components`` may name; ``"plausibility"`` is ours (module docstring)."""
PRESETS = {"paper": COMPONENTS, "plausibility": ALL_COMPONENTS}
"""Names ``components`` may take instead of a list: ``"paper"`` (the paper's utility; with ``alpha="auto"`` it also
sets the paper's ``alpha``) and ``"plausibility"``."""
PAPER_ALPHA = 0.7
"""The paper's curvature mix, and the largest value ``alpha="auto"`` takes."""
NOISE_RANGE = (0.1, 0.2)
"""``noise_range``'s default: the noise shares between which the adaptive ``gamma`` goes from 0 to its full value
(docs/methods.md, "How strong")."""


@dataclass
class ChipsScores:
    """Per-sample CHIPS scores (each ``[N]``); ``utility`` is the product of the selected components.

    ``plausibility`` is computed only when ``"plausibility"`` is a component (ones otherwise)."""

    utility: Tensor
    alignment: Tensor
    learnability: Tensor
    relevance: Tensor
    plausibility: Tensor


@dataclass
class ChipsState:
    """What a CHIPS round prepares once and every pool batch reads: memory independent of the pool size."""

    endpoint: EndPoint
    bank: NegativeBank
    direction: EndPointDirection
    mu_image: Tensor
    mu_text: Tensor
    beta: float
    components: tuple[str, ...]
    damping: float
    sketch_dim: int
    num_atoms: int
    reference: EndPoint | None = None
    """The end point adapted to the target set (``"plausibility"`` only)."""
    reference_bank: tuple[Tensor, Tensor] | None = None
    """The bank's image and text embeddings under :attr:`reference`."""
    plausibility_power: float = 10.0
    """The ``gamma`` in use this round (with ``noise_adaptive``: scaled by the noise estimate)."""
    noise: NoiseEstimate | None = None
    """The pool's estimated noise share (``"plausibility"`` with ``noise_adaptive`` only)."""
    alpha: float = PAPER_ALPHA
    """The curvature mix in use this round (with ``alpha="auto"``: set from the target-share estimate)."""
    target_share: TargetShare | None = None
    """The pool's estimated target-domain share (``alpha="auto"`` only)."""


_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_SKETCHES = ("gaussian", "rademacher")
_LAYOUTS = ("khatri_rao", "kronecker", "tensorsketch")


@dataclass(frozen=True)
class ChipsArguments:
    """Every setting of a CHIPS round, validated once when built (:func:`chips_prepare`, :func:`chips_scores` and
    :class:`~lightning_chips.scoring.CHIPS` take one instead of repeating sixteen keywords).

    Args:
        alpha: curvature mixing ``M = (1 - alpha) Phi_pos + alpha Phi_neg + lambda I`` (paper: 0.7), or
            ``"auto"``: ``0.7 (1 - hat pi_T)`` with ``hat pi_T`` the pool sample's estimated target-domain share
            (:mod:`.target_share`). With the ``"paper"`` preset of ``components``, ``"auto"`` is the paper's 0.7.
        beta: text share of the relevance weight.
        sketch_dim: JL sketch dimension ``k`` (paper: 512); ``None`` = exact (dense solve; small models).
        sketch: ``"gaussian"`` or ``"rademacher"`` sketch entries.
        sketch_layout: ``"khatri_rao"`` (default), ``"kronecker"`` or ``"tensorsketch"`` (:mod:`.sketch`).
        solver: ``"sketch"`` (paper) or ``"kernel"`` (exact Woodbury solve over the curvature atoms).
        damping: absolute ``lambda``; ``None`` = ``relative_damping * trace(M_0) / k``.
        relative_damping: ``rho`` of that rule (theta-space: the same regularisation for both solvers).
        bank_size: negatives in the bank (``>= N``: the whole pool sample, each pair excluded from its own).
        curvature_samples: pool pairs for ``Phi_pos`` / ``Phi_neg`` (``>= N``: the whole pool sample).
        negatives_per_sample: sampled GGN atoms per sample and direction for ``Phi_neg`` (softmax draws for InfoNCE,
            draws in proportion to ``sigma (1 - sigma)`` for the sigmoid loss).
        components: factors of the utility, a subset of :data:`ALL_COMPONENTS`, or a name of :data:`PRESETS`
            (default here: the paper's three, so the functional forms compute the paper's formula;
            :class:`~lightning_chips.scoring.CHIPS` defaults to all four).
        plausibility_power: ``gamma`` of ``w_P = max(pi_theta, pi_ref)^gamma`` (with ``noise_adaptive``: its
            largest value).
        noise_adaptive: scale ``gamma`` by the pool's estimated noise share each round
            (:func:`~lightning_chips.functional.plausibility.adaptive_power`): no weight on a pool estimated clean.
        noise_range: ``(a, b)`` of that scaling: ``gamma_eff = 0`` below a noise share of ``a``, ``gamma`` above ``b``.
        reference_steps: Adam steps adapting the reference end point to the target set (0: ``pi_ref = pi_theta``).
        reference_lr: their learning rate.
        seed: seed of the bank, the curvature sample, the negative draws and the sketch.
        dtype: compute precision, ``"float64"`` (default) or ``"float32"`` (or the torch dtype).
        exact_when_small: with ``dim(theta) <= sketch_dim`` solve exactly instead of sketching (``False`` forces
            the sketch, e.g. to study its error).

    Raises:
        ValueError: on a value out of range, naming the argument and what to pass.

    Example::

        >>> args = ChipsArguments(sketch_dim=256, components=("alignment", "learnability"))
        >>> args.replace(alpha=0.6).alpha
        0.6
    """

    alpha: float | str = PAPER_ALPHA
    beta: float = 0.5
    sketch_dim: int | None = 512
    sketch: SketchKind = "gaussian"
    sketch_layout: SketchLayout = "khatri_rao"
    solver: Solver = "sketch"
    damping: float | None = None
    relative_damping: float = 1e-3
    bank_size: int = 1024
    curvature_samples: int = 8192
    negatives_per_sample: int = 4
    components: tuple[str, ...] = COMPONENTS
    plausibility_power: float = 10.0
    noise_adaptive: bool = True
    noise_range: tuple[float, float] = NOISE_RANGE
    reference_steps: int = 50
    reference_lr: float = 1e-3
    seed: int = 0
    dtype: str | torch.dtype = "float64"
    exact_when_small: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.components, str) and self.components == "paper" and self.alpha == "auto":
            object.__setattr__(self, "alpha", PAPER_ALPHA)  # the paper's formula: its own curvature mix
        if self.alpha != "auto" and (
            isinstance(self.alpha, (bool, str))
            or not isinstance(self.alpha, (int, float))
            or not 0.0 <= self.alpha <= 1.0
        ):
            raise ValueError(f"`alpha` (curvature mixing) must be a number in [0, 1] or 'auto', got {self.alpha!r}.")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"`beta` (text share of the relevance weight) must be in [0, 1], got {self.beta}.")
        if isinstance(self.components, str):
            if self.components not in PRESETS:
                raise ValueError(
                    f"`components` must be a sequence of names such as ('alignment',) or a preset name in "
                    f"{sorted(PRESETS)}, got the string {self.components!r}."
                )
            object.__setattr__(self, "components", PRESETS[self.components])
        object.__setattr__(self, "components", tuple(self.components))
        unknown = set(self.components) - set(ALL_COMPONENTS)
        if unknown or not self.components:
            raise ValueError(f"`components` must be a non-empty subset of {ALL_COMPONENTS}, got {self.components}.")
        if self.sketch_dim is not None and self.sketch_dim < 3:
            raise ValueError(f"`sketch_dim` must be >= 3 or None (exact), got {self.sketch_dim}.")
        if self.sketch not in _SKETCHES:
            raise ValueError(f"`sketch` must be 'gaussian' or 'rademacher', got {self.sketch!r}.")
        if self.sketch_layout not in _LAYOUTS:
            raise ValueError(f"`sketch_layout` must be one of {_LAYOUTS}, got {self.sketch_layout!r}.")
        if self.solver not in ("sketch", "kernel"):
            raise ValueError(f"`solver` must be 'sketch' or 'kernel', got {self.solver!r}.")
        if self.damping is not None and not (math.isfinite(self.damping) and self.damping > 0):
            raise ValueError(f"`damping` must be > 0 or None (relative rule), got {self.damping}.")
        if not (math.isfinite(self.relative_damping) and self.relative_damping > 0):
            raise ValueError(f"`relative_damping` must be a finite number > 0, got {self.relative_damping}.")
        if self.bank_size < 1 or self.curvature_samples < 1:
            raise ValueError(
                f"`bank_size` and `curvature_samples` must be >= 1, got {self.bank_size}, {self.curvature_samples}."
            )
        if self.negatives_per_sample < 0:
            raise ValueError(f"`negatives_per_sample` must be >= 0, got {self.negatives_per_sample}.")
        if not (math.isfinite(self.plausibility_power) and self.plausibility_power > 0):
            raise ValueError(f"`plausibility_power` must be a finite number > 0, got {self.plausibility_power}.")
        if not isinstance(self.noise_adaptive, bool):
            raise ValueError(f"`noise_adaptive` must be True or False, got {self.noise_adaptive!r}.")
        low_high = tuple(float(v) for v in self.noise_range)
        if len(low_high) != 2 or not 0.0 <= low_high[0] < low_high[1] <= 1.0:
            raise ValueError(f"`noise_range` must be (a, b) with 0 <= a < b <= 1, got {self.noise_range}.")
        object.__setattr__(self, "noise_range", low_high)
        steps = self.reference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"`reference_steps` must be an integer >= 0, got {steps!r}.")
        if not (math.isfinite(self.reference_lr) and self.reference_lr > 0):
            raise ValueError(f"`reference_lr` must be a finite number > 0, got {self.reference_lr}.")
        if self.dtype not in _DTYPES and self.dtype not in _DTYPES.values():
            raise ValueError(f"`dtype` must be one of {sorted(_DTYPES)}, got {self.dtype!r}.")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype] if isinstance(self.dtype, str) else self.dtype

    def replace(self, **changes: object) -> ChipsArguments:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @staticmethod
    def of(arguments: ChipsArguments | None, changes: dict[str, object]) -> ChipsArguments:
        """``arguments`` (default: the defaults) with keyword ``changes``; an unknown keyword is a ``TypeError``
        naming it."""
        known = {f.name for f in dataclasses.fields(ChipsArguments)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"Unknown CHIPS argument(s) {unknown}; the arguments are {sorted(known)}.")
        return (arguments or ChipsArguments()).replace(**changes) if changes else (arguments or ChipsArguments())


def chips_prepare(
    endpoint: EndPoint,
    target_image: Tensor,
    target_text: Tensor,
    pool_image: Tensor,
    pool_text: Tensor,
    pool_ids: Tensor | None = None,
    arguments: ChipsArguments | None = None,
    **changes: Any,
) -> ChipsState:
    """Prepare a CHIPS round from the target pairs and a sample of the pool (all pre-projection features).

    ``arguments`` holds the settings (:class:`ChipsArguments`; keyword ``changes`` such as ``alpha=0.6`` override
    its fields). The bank is ``bank_size`` pool pairs drawn with ``seed`` (all of them when ``bank_size >= N``);
    the curvature is estimated on ``curvature_samples`` pool pairs drawn with ``seed + 1``. A pool pair that is in
    the bank is never its own negative (matched by ``pool_ids``, default ``arange(N)``). With ``"plausibility"`` in
    ``components`` the reference end point is adapted to the target set here, with the bank as negatives.
    """
    args = ChipsArguments.of(arguments, changes)
    beta, seed, components = args.beta, args.seed, args.components
    bank_size = args.bank_size
    if len(target_image) == 0:
        raise ValueError("The target set is empty: CHIPS needs at least one target pair to align with.")
    if len(pool_image) < 2:
        raise ValueError("CHIPS needs at least 2 pool pairs (one as a sample, one as its negative).")
    device = pool_image.device
    ep, target_image, target_text, pool_image, pool_text, pool_ids = round_inputs(
        endpoint, target_image, target_text, pool_image, pool_text, pool_ids, args.torch_dtype
    )
    n = len(pool_image)

    bank = make_bank(ep, pool_image, pool_text, pool_ids, bank_size=bank_size, seed=seed)
    # Target gradient u: mean bank-loss gradient of the target pairs (not pool members: nothing excluded).
    u = bank.mean_gradient(target_image, target_text, ep)

    curv_idx = subsample(n, args.curvature_samples, seed + 1, device)
    c_image, c_text = pool_image[curv_idx], pool_text[curv_idx]
    c_stats = bank.stats(c_image, c_text, ep, pool_ids[curv_idx])
    t_image, t_text = ep.embed_image(target_image), ep.embed_text(target_text)
    alpha, share = args.alpha, None
    if alpha == "auto":  # from the curvature sample's embeddings (already computed) and the target's
        if len(target_image) < 2:
            alpha = PAPER_ALPHA  # nothing to compare a single target pair with: the paper's mix
        else:
            share = estimate_target_share(c_stats.x, c_stats.y, t_image, t_text, beta=beta)
            alpha = adaptive_alpha(PAPER_ALPHA, share.share)
    atoms, weights = curvature_atoms(
        c_image, c_text, c_stats, bank.image, bank.text, ep, alpha=alpha,
        negatives_per_sample=args.negatives_per_sample, generator=torch.Generator().manual_seed(int(seed) + 2),
    )  # fmt: skip
    direction, lam, k = solve_direction(
        atoms, weights, u, solver=args.solver, sketch_dim=args.sketch_dim, sketch=args.sketch, damping=args.damping,
        seed=seed + 3, exact_when_small=args.exact_when_small, sketch_layout=args.sketch_layout,
        relative_damping=args.relative_damping,
    )  # fmt: skip
    reference = reference_bank = noise = None
    power = args.plausibility_power
    if "plausibility" in components:
        bank_idx = subsample(n, bank_size, seed, device)  # the bank's rows, as make_bank drew them
        reference = adapt_endpoint(ep, target_image, target_text, pool_image[bank_idx], pool_text[bank_idx],
                                   steps=args.reference_steps, lr=args.reference_lr)  # fmt: skip
        reference_bank = (reference.embed_image(pool_image[bank_idx]), reference.embed_text(pool_text[bank_idx]))
        if args.noise_adaptive:
            noise = estimate_noise_share([(bank.image, bank.text), reference_bank], seed=seed + 4)
            power = adaptive_power(power, noise.share, args.noise_range)
    return ChipsState(
        endpoint=ep,
        bank=bank,
        direction=direction,
        mu_image=F.normalize(t_image.mean(0), dim=0),
        mu_text=F.normalize(t_text.mean(0), dim=0),
        beta=beta,
        components=tuple(components),
        damping=lam,
        sketch_dim=k,
        num_atoms=len(atoms),
        reference=reference,
        reference_bank=reference_bank,
        plausibility_power=power,
        noise=noise,
        alpha=float(alpha),
        target_share=share,
    )


def chips_score_batch(state: ChipsState, image: Tensor, text: Tensor, ids: Tensor | None = None) -> ChipsScores:
    """Score one batch of pool pairs (pre-projection features) against a prepared :class:`ChipsState`.

    Pure given the state: a pair's scores do not depend on the rest of its batch. ``ids`` identify pairs that
    are also in the bank (excluded from their own negatives).
    """
    dtype, device = state.bank.image.dtype, state.bank.image.device
    image, text = image.to(device, dtype), text.to(device, dtype)
    stats = state.bank.stats(image, text, state.endpoint, ids)
    grads = grads_from_stats(image, text, stats, state.bank.image, state.bank.text, state.endpoint)
    alignment = grads.dot(state.direction)
    learnability = stats.learnability()
    relevance = torch.sigmoid((1.0 - state.beta) * (stats.x @ state.mu_image) + state.beta * (stats.y @ state.mu_text))
    plausibility = torch.ones_like(alignment)
    if "plausibility" in state.components and state.plausibility_power > 0:
        exclude = state.bank.exclusion(ids)
        ref, (ref_image, ref_text) = state.reference, state.reference_bank
        ranks = [
            bank_rank(stats.x, stats.y, state.bank.image, state.bank.text, exclude),
            bank_rank(ref.embed_image(image), ref.embed_text(text), ref_image, ref_text, exclude),
        ]
        plausibility = plausibility_weight(ranks, state.plausibility_power)
    utility = torch.ones_like(alignment)
    factors = (("alignment", alignment), ("learnability", learnability), ("relevance", relevance),
               ("plausibility", plausibility))  # fmt: skip
    for name, value in factors:
        if name in state.components:
            utility = utility * value
    return ChipsScores(utility, alignment, learnability, relevance, plausibility)


def chips_scores(
    pool_image: Tensor,
    pool_text: Tensor,
    target_image: Tensor,
    target_text: Tensor,
    endpoint: EndPoint,
    arguments: ChipsArguments | None = None,
    *,
    batch_size: int = 4096,
    **changes: Any,
) -> ChipsScores:
    """CHIPS scores of every pool pair (docs/methods.md, CHIPS), from pre-projection features.

    Args:
        pool_image: ``[N, d_v]`` pool image features ``h_v``.
        pool_text: ``[N, d_t]`` pool text features ``h_t``.
        target_image: ``[T, d_v]`` target image features.
        target_text: ``[T, d_t]`` target text features.
        endpoint: the CLIP's end point (:func:`lightning_chips.adapters.resolve_adapter`).
        arguments: the settings (:class:`ChipsArguments`, default: the paper's); keyword ``changes`` (``alpha=0.6``,
            ``sketch_dim=None``, ...) override its fields.
        batch_size: pool pairs scored at once (scores do not depend on it).

    Returns:
        :class:`ChipsScores` with ``utility``, ``alignment``, ``learnability``, ``relevance``, ``plausibility``
        (each ``[N]``).

    Example::

        >>> import torch
        >>> from lightning_chips.endpoint import EndPoint
        >>> g = torch.Generator().manual_seed(0)
        >>> ep = EndPoint(torch.randn(8, 4, generator=g), torch.randn(6, 4, generator=g), torch.tensor(2.0))
        >>> out = chips_scores(torch.randn(50, 8, generator=g), torch.randn(50, 6, generator=g),
        ...                    torch.randn(5, 8, generator=g), torch.randn(5, 6, generator=g), ep, sketch_dim=None)
        >>> out.utility.shape
        torch.Size([50])
    """
    state = chips_prepare(endpoint, target_image, target_text, pool_image, pool_text, None,
                          ChipsArguments.of(arguments, changes))  # fmt: skip
    ids = torch.arange(len(pool_image), device=pool_image.device)
    parts = [
        chips_score_batch(state, pool_image[i : i + batch_size], pool_text[i : i + batch_size], ids[i : i + batch_size])
        for i in range(0, len(pool_image), batch_size)
    ]
    return ChipsScores(*(torch.cat([getattr(p, name) for p in parts]) for name in ("utility", *ALL_COMPONENTS)))
