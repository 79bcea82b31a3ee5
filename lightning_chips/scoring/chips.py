"""The streaming CHIPS scorer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

from torch import Tensor

from lightning_chips.endpoint import EndPoint
from lightning_chips.features import PairFeatures
from lightning_chips.functional.chips import (
    COMPONENTS,
    NOISE_RANGE,
    ChipsArguments,
    ChipsScores,
    ChipsState,
    chips_prepare,
    chips_score_batch,
)
from lightning_chips.scoring.base import Scorer, on_endpoint_device

__all__ = ["CHIPS", "ROBUST_COMPONENTS"]

ROBUST_COMPONENTS: tuple[str, ...] = (*COMPONENTS, "plausibility")
"""The paper's utility times the plausibility weight: ``CHIPS()``'s default components (the ``"plausibility"``
preset; ``components="paper"`` is the paper's utility alone)."""


class CHIPS(Scorer):
    """CHIPS utility ``U = A * w_L * w_R * w_P`` (Zhuang et al., CVPR 2026, times our noise-adaptive plausibility
    weight ``w_P``; ``CHIPS(components="paper")`` is the paper's ``A * w_L * w_R``; docs/methods.md, CHIPS).

    ``A(z) = g(z)^T M^{-1} u`` is the curvature-aware Newton alignment of a pool pair's end-point gradient with
    the mean target gradient, ``M = (1 - alpha) Phi_pos + alpha Phi_neg + lambda I`` estimated on a pool sample
    and solved once per round (JL-sketched by default, or exactly with the kernel solver); ``w_L`` damps pairs
    the model already solves and boosts violated ones; ``w_R`` weighs closeness to the target's mean
    embeddings. See :mod:`lightning_chips.functional.chips` for the formulas and the ``Phi_neg`` estimator.

    **Curvature mix (ours; on by default).** ``alpha="auto"`` (the default) sets ``alpha = 0.7 (1 - hat pi_T)``
    each round from the pool sample's estimated target-domain share ``hat pi_T``
    (:mod:`lightning_chips.functional.target_share`): the paper's 0.7 on a pool where the target domain is rare,
    (almost) positive-only curvature on a pool that is mostly the target domain, where the paper's mix drifts to
    rare classes at small budgets (docs/methods.md, "How much negative curvature").

    **Plausibility (ours, beyond the paper; on by default).** With ``"plausibility"`` among the ``components``
    (the default) the utility is also multiplied by ``w_P = max(pi_theta, pi_ref)^gamma_eff``: the bank rank of
    each pair's true partner under the model and under a copy of the end point adapted to the target set
    (:mod:`lightning_chips.functional.plausibility`). The paper's product rewards mismatched and uninformative
    captions, whose gradients are large and, for target-domain images, point to the target; ``w_P`` stops that.
    With ``noise_adaptive`` (the default) each round estimates the pool's share of such captions from the bank
    and sets ``gamma_eff`` from it: 0 (the paper's utility, exactly) on a pool estimated cleaner than
    ``noise_range[0]``, ``plausibility_power`` above ``noise_range[1]``. ``CHIPS()`` is the configuration
    docs/benchmarks/quality.md measures as the best or tied on noisy and clean pools; ``components="paper"`` is the
    paper's formula (its three factors, and ``alpha = 0.7`` unless ``alpha`` is given a number).

    :meth:`prepare` keeps only the bank (``bank_size x e``), a theta-space direction and two mean embeddings
    (plus, with plausibility, the reference end point and the bank under it), so streaming :meth:`score` over
    millions of pairs needs memory independent of the pool size, and each pair costs
    ``O((d_v + d_t) e + bank_size * e)`` on top of its forward pass (twice that with plausibility).

    Args:
        alpha: curvature mixing (paper: 0.7, best in [0.6, 0.8] on its pools); 0 = positive-only curvature;
            ``"auto"`` (default): ``0.7 (1 - hat pi_T)`` from the pool's estimated target-domain share (0.7 with
            ``components="paper"``).
        beta: text share of the relevance weight.
        sketch_dim: JL sketch dimension (paper: 512); ``None`` = exact.
        sketch: ``"gaussian"`` or ``"rademacher"`` entries.
        sketch_layout: ``"khatri_rao"`` (default: each sketch row is a random rank-one direction per head, the
            realised dimension is ``sketch_dim``), ``"kronecker"`` or ``"tensorsketch"``
            (:mod:`lightning_chips.functional.sketch`).
        solver: ``"sketch"`` (paper) or ``"kernel"`` (exact Woodbury solve over the curvature atoms).
        damping: absolute ``lambda``; ``None`` = ``relative_damping * trace(M_0) / k``.
        relative_damping: ``rho`` of that rule, a theta-space quantity (the same regularisation for both solvers).
        bank_size: negatives per sample (pool pairs drawn with ``seed``).
        curvature_samples: pool pairs used to estimate the curvature.
        negatives_per_sample: sampled GGN atoms per sample and direction for ``Phi_neg`` (softmax draws for InfoNCE,
            draws in proportion to ``sigma (1 - sigma)`` for a SigLIP model's sigmoid loss).
        components: utility factors, a subset of ``("alignment", "learnability", "relevance", "plausibility")``
            (ablations: ``("alignment",)``, ``("alignment", "learnability")``, ...), or a preset name:
            ``"plausibility"`` (the default: all four) or ``"paper"`` (the paper's three).
        plausibility_power: ``gamma`` of the plausibility weight (with ``noise_adaptive``: its largest value).
        noise_adaptive: set ``gamma`` each round from the pool's estimated noise share (``False``: always
            ``plausibility_power``).
        noise_range: ``(a, b)``: no weight on a pool estimated below ``a`` noisy, the full ``gamma`` above ``b``,
            linear in between.
        reference_steps: Adam steps adapting the reference end point to the target set (0: no reference).
        reference_lr: their learning rate.
        seed: seed of the bank, curvature sample, negative draws and sketch.
        dtype: ``"float64"`` (default) or ``"float32"`` compute precision.

    The settings are held, validated once, in :attr:`arguments` (a
    :class:`~lightning_chips.functional.chips.ChipsArguments`, whose ``exact_when_small`` stays ``True`` here), read
    as attributes (``scorer.alpha``); ``repr(scorer)`` and :meth:`~lightning_chips.scoring.Scorer.config` list every
    field.

    A :class:`~lightning_chips.functional.chips.ChipsArguments` typed once builds the same scorer:
    ``CHIPS.from_arguments(ChipsArguments(alpha=0.6, components="plausibility"))`` is
    ``CHIPS(alpha=0.6, components="plausibility")`` with the other keywords at ``ChipsArguments``'s defaults.

    Raises:
        ValueError: on an argument out of range, naming it and what to pass.

    Example::

        >>> scorer = CHIPS(bank_size=2048)  # the recommended configuration: noise-adaptive plausibility
        >>> paper = CHIPS(components="paper")  # the paper's utility (alpha = 0.7)
        >>> fixed = CHIPS(noise_adaptive=False)  # the plausibility weight at gamma = plausibility_power always
        >>> scorer.prepare(endpoint, target_features, pool_features)  # doctest: +SKIP
        >>> scores = scorer.score(pool_features.index(slice(0, 512)))  # doctest: +SKIP
    """

    name: ClassVar[str] = "chips"

    def __init__(
        self,
        *,
        alpha: float | Literal["auto"] = "auto",
        beta: float = 0.5,
        sketch_dim: int | None = 512,
        sketch: Literal["gaussian", "rademacher"] = "gaussian",
        sketch_layout: Literal["khatri_rao", "kronecker", "tensorsketch"] = "khatri_rao",
        solver: Literal["sketch", "kernel"] = "sketch",
        damping: float | None = None,
        relative_damping: float = 1e-3,
        bank_size: int = 1024,
        curvature_samples: int = 8192,
        negatives_per_sample: int = 4,
        components: Sequence[str] | str = ROBUST_COMPONENTS,
        plausibility_power: float = 10.0,
        noise_adaptive: bool = True,
        noise_range: tuple[float, float] = NOISE_RANGE,
        reference_steps: int = 50,
        reference_lr: float = 1e-3,
        seed: int = 0,
        dtype: Literal["float32", "float64"] = "float64",
    ) -> None:
        self.arguments = ChipsArguments(
            alpha=alpha, beta=beta, sketch_dim=sketch_dim, sketch=sketch, sketch_layout=sketch_layout, solver=solver,
            damping=damping, relative_damping=relative_damping, bank_size=bank_size,
            curvature_samples=curvature_samples, negatives_per_sample=negatives_per_sample,
            components=components if isinstance(components, str) else tuple(components),
            plausibility_power=plausibility_power, noise_adaptive=noise_adaptive, noise_range=tuple(noise_range),
            reference_steps=reference_steps,
            reference_lr=reference_lr, seed=seed, dtype=dtype,
        )  # fmt: skip
        self.state: ChipsState | None = None

    def prepare_round(self, endpoint: EndPoint, target: PairFeatures | None, pool_sample: PairFeatures) -> None:
        self.state = chips_prepare(endpoint, *on_endpoint_device(endpoint, target, pool_sample), self.arguments)

    def score_components(self, batch: PairFeatures) -> ChipsScores:
        """Every per-pair quantity (utility, alignment, learnability, relevance, plausibility) of a batch."""
        if self.state is None:
            raise RuntimeError("CHIPS.score called before prepare(); a selection round prepares the scorer first.")
        return chips_score_batch(self.state, batch.image, batch.text, batch.ids)

    def score(self, batch: PairFeatures) -> Tensor:
        return self.score_components(batch).utility

    def round_metrics(self) -> dict[str, float]:
        """The prepared round's estimates and the settings they set: ``target_share`` (the pool's estimated
        target-domain share) and ``alpha`` (the curvature mix it set) with ``alpha="auto"``; ``noise_share`` (the
        pool's estimated share of pairs whose caption does not fit the image) and ``plausibility_power`` (the
        ``gamma`` it set) when the plausibility weight adapts."""
        metrics: dict[str, float] = {}
        if self.state is None:
            return metrics
        if self.state.target_share is not None:
            metrics.update(target_share=self.state.target_share.share, alpha=self.state.alpha)
        if self.state.noise is not None:
            metrics.update(noise_share=self.state.noise.share, plausibility_power=self.state.plausibility_power)
        return metrics

    def summary(self) -> str:
        if self.state is None:
            return "CHIPS (not prepared)"
        st = self.state
        return (
            f"CHIPS alpha={st.alpha:.3g}"
            + (f" (auto: target_share~{st.target_share.share:.2f})" if st.target_share is not None else "")
            + f" solver={self.solver} k={st.sketch_dim} atoms={st.num_atoms} "
            f"bank={len(st.bank.ids)} lambda={st.damping:.3g} components={'*'.join(self.components)}"
            + (" loss=sigmoid" if st.endpoint.loss == "sigmoid" else "")
            + (f" reference_steps={self.reference_steps}" if "plausibility" in self.components else "")
            + (f" gamma={st.plausibility_power:.3g}" if "plausibility" in self.components else "")
            + (f" (of {self.plausibility_power:g}: noise_share~{st.noise.share:.2f})" if st.noise is not None else "")
        )
