"""Influence scorers in the end-point subspace: Dot, TracIn, TRAK (docs/methods.md, influence baselines)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from lightning_chips.endpoint import EndPoint
from lightning_chips.features import PairFeatures
from lightning_chips.functional.influence import InfluenceState, influence_prepare, influence_score_batch
from lightning_chips.scoring.base import Scorer, choice_setting, integer_setting, on_endpoint_device, real_setting

__all__ = ["TRAK", "Dot", "InfluenceArguments", "TracIn"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class InfluenceArguments:
    """The settings of :class:`Dot`, :class:`TRAK` and :class:`TracIn` (validated once when built).

    Args:
        sketch_dim: JL sketch dimension ``k``; ``None`` = exact (the identity projection). Dot and TracIn default
            to ``None``, TRAK to 512.
        sketch: ``"gaussian"`` or ``"rademacher"`` sketch entries.
        damping: TRAK's ``lambda``; ``None`` = ``1e-3 * trace / k``.
        bank_size: negatives per sample (pool pairs drawn with ``seed``).
        train_samples: pool pairs of TRAK's kernel ``Phi^T Phi``.
        seed: seed of the bank, the training sample and the sketch.
        dtype: ``"float64"`` (default) or ``"float32"`` compute precision.

    Raises:
        ValueError: on a value out of range, naming the argument and what to pass.
    """

    sketch_dim: int | None = None
    sketch: Literal["gaussian", "rademacher"] = "gaussian"
    damping: float | None = None
    bank_size: int = 1024
    train_samples: int = 8192
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float64"

    def __post_init__(self) -> None:
        if self.sketch_dim is not None:
            try:
                object.__setattr__(self, "sketch_dim", integer_setting("sketch_dim", self.sketch_dim, minimum=3))
            except ValueError:
                raise ValueError(
                    f"`sketch_dim` must be an integer >= 3 or None (identity projection), got {self.sketch_dim!r}."
                ) from None
        choice_setting("sketch", self.sketch, ("gaussian", "rademacher"))
        if self.damping is not None:
            object.__setattr__(self, "damping", real_setting("damping", self.damping, above=0))
        object.__setattr__(self, "bank_size", integer_setting("bank_size", self.bank_size, minimum=1))
        object.__setattr__(self, "train_samples", integer_setting("train_samples", self.train_samples, minimum=1))
        object.__setattr__(self, "seed", integer_setting("seed", self.seed))
        choice_setting("dtype", self.dtype, tuple(_DTYPES))


class _InfluenceScorer(Scorer):
    method: ClassVar[str] = "dot"

    def __init__(
        self,
        *,
        sketch_dim: int | None = None,
        sketch: Literal["gaussian", "rademacher"] = "gaussian",
        damping: float | None = None,
        bank_size: int = 1024,
        train_samples: int = 8192,
        seed: int = 0,
        dtype: Literal["float32", "float64"] = "float64",
    ) -> None:
        self.arguments = InfluenceArguments(sketch_dim=sketch_dim, sketch=sketch, damping=damping, bank_size=bank_size,
                                            train_samples=train_samples, seed=seed, dtype=dtype)  # fmt: skip
        self.state: InfluenceState | None = None

    def prepare_round(self, endpoint: EndPoint, target: PairFeatures | None, pool_sample: PairFeatures) -> None:
        self.state = influence_prepare(
            endpoint, *on_endpoint_device(endpoint, target, pool_sample), method=self.method,
            sketch_dim=self.sketch_dim, sketch=self.sketch, damping=self.damping, bank_size=self.bank_size,
            train_samples=self.train_samples, seed=self.seed, dtype=_DTYPES[self.dtype],
        )  # fmt: skip

    def score(self, batch: PairFeatures) -> Tensor:
        if self.state is None:
            raise RuntimeError(f"{type(self).__name__}.score called before prepare().")
        return influence_score_batch(self.state, batch.image, batch.text, batch.ids)


class Dot(_InfluenceScorer):
    """Gradient dot product ``g(z)^T u`` with the mean target gradient (exact; JL-sketched with ``sketch_dim``).

    The settings (:class:`InfluenceArguments`, held in :attr:`arguments`; ``Dot.from_arguments(InfluenceArguments(
    ...))`` builds it from one): ``sketch_dim`` (default ``None``, exact), ``sketch``, ``bank_size``, ``seed``,
    ``dtype``; ``damping`` and ``train_samples`` are TRAK's and do not change Dot's scores.
    """

    name: ClassVar[str] = "dot"
    method: ClassVar[str] = "dot"


class TRAK(_InfluenceScorer):
    """TRAK: ``phi(z)^T (Phi^T Phi + lambda I)^{-1} phi_u * (1 - p_corr(z))`` with ``phi = P g`` (k = 512).

    ``Phi`` stacks the sketched gradients of ``train_samples`` pool pairs; ``sketch_dim=None`` is the identity
    projection. Ensembles over checkpoints: :func:`lightning_chips.functional.influence.trak_scores`. The settings
    are an :class:`InfluenceArguments`, held in :attr:`arguments` (``TRAK.from_arguments`` builds it from one); they
    are Dot's, with ``sketch_dim=512`` by default.
    """

    name: ClassVar[str] = "trak"
    method: ClassVar[str] = "trak"

    def __init__(self, *, sketch_dim: int | None = 512, sketch: Literal["gaussian", "rademacher"] = "gaussian",
                 damping: float | None = None, bank_size: int = 1024, train_samples: int = 8192, seed: int = 0,
                 dtype: Literal["float32", "float64"] = "float64") -> None:  # fmt: skip
        super().__init__(sketch_dim=sketch_dim, sketch=sketch, damping=damping, bank_size=bank_size,
                         train_samples=train_samples, seed=seed, dtype=dtype)  # fmt: skip


class TracIn(Dot):
    """TracIn ``sum_c eta_c g_c(z)^T u_c``, accumulated over the selection rounds of a Lightning run.

    Each round is a checkpoint: its term is ``learning_rate * g(z)^T u`` with the learning rate the caller sets
    (:class:`~lightning_chips.DataSelectionCallback` sets the optimizer's current one) and a pair's round score is
    its total from earlier rounds plus that term. The totals are kept by id (O(N) floats, in :meth:`state_dict`):
    the round engine hands every rank the gathered ``[N]`` scores of every rank's pairs through :meth:`end_round`,
    and those become the history, so under DDP every rank holds the totals of the whole pool (not only of the pairs
    it scored) and a checkpoint, saved from rank 0, restores all of them on every rank. The recorded totals are the
    round's scores as the engine gathers them (float32); a pair that was not scored in a round (it failed to load)
    keeps its earlier total. Used outside the engine (``prepare`` and ``score`` called directly, no
    :meth:`end_round`), the next :meth:`prepare` or :meth:`state_dict` records the totals this process scored.
    Offline over a list of checkpoints: :func:`lightning_chips.functional.influence.tracin_scores`.

    The settings (:class:`InfluenceArguments`, held in :attr:`arguments`) are Dot's.
    """

    name: ClassVar[str] = "tracin"
    _past_ids: Tensor = torch.zeros(0, dtype=torch.int64)
    """The ids with a recorded total, sorted (replaced, never changed in place, so the empty default is shared)."""
    _past_totals: Tensor = torch.zeros(0, dtype=torch.float64)
    """Their totals over the recorded rounds."""
    _pending: tuple | list = ()
    """This process's ``(ids, totals)`` scored since the last record (a list from the first :meth:`prepare`)."""

    def prepare_round(self, endpoint: EndPoint, target: PairFeatures | None, pool_sample: PairFeatures) -> None:
        self._commit()
        self._pending = []
        super().prepare_round(endpoint, target, pool_sample)

    def end_round(self, ids: Tensor, scores: Tensor) -> None:
        """Record the round's totals of every scored pair of every rank (``scores`` are this scorer's totals, as
        the engine gathered them); what this process scored itself is then superseded."""
        if len(ids) != len(scores):
            raise ValueError(f"TracIn.end_round: {len(ids)} ids but {len(scores)} scores.")
        self._pending = []
        self._record(ids.detach().cpu().long(), scores.detach().cpu().double())

    def _commit(self) -> None:
        """Record the totals this process scored since the last round (only used without :meth:`end_round`)."""
        if self._pending:
            pending, self._pending = self._pending, []
            self._record(torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending]))

    def _record(self, ids: Tensor, totals: Tensor) -> None:
        """Merge ``(ids, totals)`` into the id-sorted history; the latest total of an id wins."""
        ids, totals = torch.cat([self._past_ids, ids]), torch.cat([self._past_totals, totals])
        order = torch.argsort(ids, stable=True)
        ids, totals = ids[order], totals[order]
        last = torch.ones(len(ids), dtype=torch.bool)
        last[:-1] = ids[1:] != ids[:-1]
        self._past_ids, self._past_totals = ids[last], totals[last]

    def _past(self, ids: Tensor) -> Tensor:
        out = torch.zeros(len(ids), dtype=torch.float64)
        if len(self._past_ids):
            pos = torch.searchsorted(self._past_ids, ids).clamp(max=len(self._past_ids) - 1)
            hit = self._past_ids[pos] == ids
            out[hit] = self._past_totals[pos[hit]]
        return out

    def score(self, batch: PairFeatures) -> Tensor:
        term = float(self.learning_rate) * super().score(batch).double().cpu()
        ids = batch.ids.cpu()
        total = self._past(ids) + term
        self._pending.append((ids, total))
        return total.to(batch.image.device)

    def state_dict(self) -> dict:
        """The totals of every pair scored so far (``ids`` sorted, ``totals``); the same on every rank."""
        self._commit()
        return {"ids": self._past_ids.clone(), "totals": self._past_totals.clone()}

    def load_state_dict(self, state: dict) -> None:
        self._past_ids, self._past_totals, self._pending = state["ids"].long(), state["totals"].double(), []
