"""The Scorer contract: ``prepare`` once per selection round, then stream ``score`` over the pool."""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lightning_chips.endpoint import EndPoint
from lightning_chips.features import PairFeatures

__all__ = ["IdLookup", "RoundContext", "Scorer", "check_prepare_inputs"]


@dataclass(frozen=True)
class RoundContext:
    """What a selection round tells its scorer, passed to :meth:`Scorer.prepare` (never set as attributes).

    Attributes:
        round: the selection round being scored (0 for a one-shot ``lightning-chips score``).
        learning_rate: the optimizer's learning rate at this round (TracIn weights rounds by it).
        text_encoder: normalised text embeddings ``[P, e]`` of prompts under the current model (class prompts for
            zero-shot pseudo-labels, CLIP-powered selection); the callback and ``lightning-chips score`` give one.
        seed: the selection's seed (the pool sample's draw; scorers keep their own ``seed`` argument).

    Example::

        >>> scorer.prepare(endpoint, target, pool_sample, RoundContext(round=3, learning_rate=1e-4))  # doctest: +SKIP
    """

    round: int = 0
    learning_rate: float = 1.0
    text_encoder: Callable[[list[str]], Tensor] | None = None
    seed: int = 0


class Scorer(ABC):
    """A data-selection score: higher means "train on this pair".

    Lifecycle per selection round: :meth:`prepare` with the current end point, the target pairs' features and a
    sample of the pool's features computes the round's statistics (target gradient, curvature solve, bank, ...);
    :meth:`score` is then called on consecutive pool batches and must be pure given the prepared state (a
    pair's score does not depend on its batch), with memory independent of the pool size.

    Class attributes:
        name: the registry name (``build_scorer(name)``).
        requires_target: whether :meth:`prepare` needs target pairs.

    A round's context (its index, learning rate, prompt encoder, seed) arrives as the :class:`RoundContext`
    argument of :meth:`prepare`; :attr:`round`, :attr:`learning_rate` and :attr:`text_encoder` read it.
    """

    name: ClassVar[str] = ""
    requires_target: bool = True
    """Whether :meth:`prepare` needs target pairs (a class attribute; composites set it from their parts)."""
    context: RoundContext = RoundContext()
    """The :class:`RoundContext` of the last :meth:`prepare` (recorded by :meth:`use_context`)."""

    @property
    def round(self) -> int:
        """The round being scored (from the context)."""
        return self.context.round

    @property
    def learning_rate(self) -> float:
        """The round's learning rate (from the context)."""
        return self.context.learning_rate

    @property
    def text_encoder(self) -> Callable[[list[str]], Tensor] | None:
        """The round's prompt encoder (from the context)."""
        return self.context.text_encoder

    def __init_subclass__(cls, **kwargs) -> None:
        """A scorer written before :class:`RoundContext` (``prepare(endpoint, target, pool_sample)``) keeps working:
        its ``prepare`` is wrapped to take the context and record it, so :attr:`round` and friends read it."""
        super().__init_subclass__(**kwargs)
        prepare = cls.__dict__.get("prepare")
        if prepare is None or getattr(prepare, "__isabstractmethod__", False):
            return
        if len(inspect.signature(prepare).parameters) == 4:  # self, endpoint, target, pool_sample

            @functools.wraps(prepare)
            def prepare_with_context(self, endpoint, target, pool_sample, context=None):  # noqa: ANN001
                self.use_context(context)
                return prepare(self, endpoint, target, pool_sample)

            cls.prepare = prepare_with_context

    def use_context(self, context: RoundContext | None) -> RoundContext:
        """Record the round's context (``None``: the defaults); implementations call it first in :meth:`prepare`."""
        if context is not None and not isinstance(context, RoundContext):
            raise TypeError(f"`context` must be a RoundContext, got {type(context).__name__}.")
        self.context = context if context is not None else RoundContext()
        return self.context

    def end_round(self, ids: Tensor, scores: Tensor) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Called on every rank once a round's scores are gathered, with the ``[N]`` int64 ids (keys of string ids)
        and ``[N]`` float32 scores of every scored pool pair of every rank, each id once, in pool order. A scorer that
        keeps history across rounds (TracIn's running totals) records it here, so every rank holds the whole
        history and :meth:`state_dict` (saved from rank 0) has it."""

    def state_dict(self) -> dict:
        """State that must survive a checkpoint (most scorers have none: they are prepared anew each round)."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Restore :meth:`state_dict`."""

    @abstractmethod
    def prepare(
        self,
        endpoint: EndPoint,
        target: PairFeatures | None,
        pool_sample: PairFeatures,
        context: RoundContext | None = None,
    ) -> None:
        """Compute the round's statistics; ``context`` says which round (call :meth:`use_context` first)."""

    @abstractmethod
    def score(self, batch: PairFeatures) -> Tensor:
        """``[B]`` float scores of a batch of pool pairs."""

    def summary(self) -> str:
        """One line describing the prepared state (logged once per round)."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class IdLookup:
    """Per-pair values computed at ``prepare`` time over a pool sample, looked up by id when scoring.

    The pattern of set-level methods (negCLIPLoss partitions, ClipCov's greedy, CLIP-powered selection).
    """

    def __init__(self, ids: Tensor, values: Tensor) -> None:
        order = torch.argsort(ids.cpu())
        self.ids, self.values = ids.cpu()[order], values.cpu()[order]

    def find(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(values, known)`` for ``ids``; ``known`` marks ids that were prepared (their value is valid)."""
        ids = ids.cpu()
        pos = torch.searchsorted(self.ids, ids).clamp(max=len(self.ids) - 1)
        return self.values[pos].clone(), self.ids[pos] == ids

    def require(self, ids: Tensor, method: str) -> Tensor:
        """Values of ``ids``, all of which must have been prepared."""
        values, known = self.find(ids)
        if not bool(known.all()):
            raise ValueError(
                f"{method} is set-level: it can only score pairs it was prepared on; prepare it on the whole pool "
                "(DataSelectionCallback(pool_sample=None))."
            )
        return values


def check_prepare_inputs(
    scorer: Scorer,
    endpoint: EndPoint | None,
    target: PairFeatures | None,
    pool_sample: PairFeatures | None,
    *,
    uses_target: bool,
    uses_pool_sample: bool = True,
) -> None:
    """Validate what :meth:`Scorer.prepare` receives, before any work, with messages that say what to change.

    * ``uses_target``: the target must be given and hold at least one pair.
    * ``uses_pool_sample``: the pool sample must hold at least one pair.
    * The end point and the features the scorer reads (the target when ``uses_target``, the pool sample when
      ``uses_pool_sample``) must be finite: NaN or inf there (a diverged model, corrupt cached features) would
      otherwise spread silently into every score, or surface deep inside as a solver or sampling failure. The
      error names the round and the first offending ids.

    Raises:
        ValueError: a missing or empty target (when ``uses_target``), or an empty pool sample.
        FloatingPointError: NaN or inf in the end point or the features.
    """
    name = type(scorer).__name__
    if uses_target and (target is None or len(target) == 0):
        got = "none" if target is None else "an empty set"
        raise ValueError(
            f"{name} needs target pairs (a small set from the domain you adapt to), got {got}: pass `target` "
            "(DataSelectionCallback(target=...), or `--target` / `target=` of `lightning-chips score`) with at "
            "least one image-caption pair."
        )
    if uses_pool_sample and pool_sample is not None and len(pool_sample) == 0:
        raise ValueError(f"{name}: the pool sample is empty; the pool must hold at least one usable pair.")
    if endpoint is not None:
        fields = [
            field
            for field in ("image_proj", "text_proj", "logit_scale", "image_bias", "text_bias")
            if getattr(endpoint, field) is not None and not bool(torch.isfinite(getattr(endpoint, field)).all())
        ]
        if fields:
            raise FloatingPointError(
                f"{name}: the model's end point holds NaN or inf in {', '.join(fields)} (round {scorer.round}): the "
                "model has diverged. Resume from an earlier checkpoint, or lower the learning rate."
            )
    used = (("target", target if uses_target else None), ("pool-sample", pool_sample if uses_pool_sample else None))
    for what, features in used:
        if features is None:
            continue
        bad_image = ~torch.isfinite(features.image).all(1)
        bad_text = ~torch.isfinite(features.text).all(1)
        bad = (bad_image | bad_text).cpu()
        if bool(bad.any()):
            sides = " and ".join(side for side, b in (("image", bad_image), ("text", bad_text)) if bool(b.any()))
            first = features.ids.cpu()[bad][:5].tolist()
            raise FloatingPointError(
                f"{name}: {int(bad.sum())} of the {len(features)} {what} pairs have NaN or inf {sides} features "
                f"(round {scorer.round}, first ids {first}): the model may have diverged (check the training loss, "
                "learning rate and precision) or the features are corrupt."
            )
