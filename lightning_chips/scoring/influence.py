"""Influence scorers in the end-point subspace: Dot, TracIn, TRAK (docs/methods.md, influence baselines)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from lightning_chips.endpoint import EndPoint
from lightning_chips.features import PairFeatures
from lightning_chips.functional.influence import InfluenceState, influence_prepare, influence_score_batch
from lightning_chips.scoring.base import RoundContext, Scorer, check_prepare_inputs

__all__ = ["TRAK", "Dot", "TracIn"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class _InfluenceScorer(Scorer):
    method: ClassVar[str] = "dot"

    def __init__(
        self,
        *,
        sketch_dim: int | None,
        sketch: Literal["gaussian", "rademacher"] = "gaussian",
        damping: float | None = None,
        bank_size: int = 1024,
        train_samples: int = 8192,
        seed: int = 0,
        dtype: Literal["float32", "float64"] = "float64",
    ) -> None:
        if sketch_dim is not None and sketch_dim < 3:
            raise ValueError(f"`sketch_dim` must be >= 3 or None (identity projection), got {sketch_dim}.")
        if sketch not in ("gaussian", "rademacher"):
            raise ValueError(f"`sketch` must be 'gaussian' or 'rademacher', got {sketch!r}.")
        if damping is not None and damping <= 0:
            raise ValueError(f"`damping` must be > 0 or None, got {damping}.")
        if bank_size < 1 or train_samples < 1:
            raise ValueError(f"`bank_size` and `train_samples` must be >= 1, got {bank_size}, {train_samples}.")
        if dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        self.sketch_dim, self.sketch, self.damping = sketch_dim, sketch, damping
        self.bank_size, self.train_samples, self.seed, self.dtype = bank_size, train_samples, seed, dtype
        self.state: InfluenceState | None = None

    def prepare(
        self,
        endpoint: EndPoint,
        target: PairFeatures | None,
        pool_sample: PairFeatures,
        context: RoundContext | None = None,
    ) -> None:
        self.use_context(context)
        check_prepare_inputs(self, endpoint, target, pool_sample, uses_target=True)
        device = endpoint.image_proj.device
        self.state = influence_prepare(
            endpoint, target.image.to(device), target.text.to(device), pool_sample.image.to(device),
            pool_sample.text.to(device), pool_sample.ids.to(device), method=self.method, sketch_dim=self.sketch_dim,
            sketch=self.sketch, damping=self.damping, bank_size=self.bank_size, train_samples=self.train_samples,
            seed=self.seed, dtype=_DTYPES[self.dtype],
        )  # fmt: skip

    def score(self, batch: PairFeatures) -> Tensor:
        if self.state is None:
            raise RuntimeError(f"{type(self).__name__}.score called before prepare().")
        return influence_score_batch(self.state, batch.image, batch.text, batch.ids)


class Dot(_InfluenceScorer):
    """Gradient dot product ``g(z)^T u`` with the mean target gradient (exact; JL-sketched with ``sketch_dim``)."""

    name: ClassVar[str] = "dot"
    method: ClassVar[str] = "dot"

    def __init__(self, *, sketch_dim: int | None = None, **kwargs) -> None:
        super().__init__(sketch_dim=sketch_dim, **kwargs)


class TRAK(_InfluenceScorer):
    """TRAK: ``phi(z)^T (Phi^T Phi + lambda I)^{-1} phi_u * (1 - p_corr(z))`` with ``phi = P g`` (k = 512).

    ``Phi`` stacks the sketched gradients of ``train_samples`` pool pairs; ``sketch_dim=None`` is the identity
    projection. Ensembles over checkpoints: :func:`lightning_chips.functional.influence.trak_scores`.
    """

    name: ClassVar[str] = "trak"
    method: ClassVar[str] = "trak"

    def __init__(self, *, sketch_dim: int | None = 512, **kwargs) -> None:
        super().__init__(sketch_dim=sketch_dim, **kwargs)


class TracIn(Dot):
    """TracIn ``sum_c eta_c g_c(z)^T u_c``, accumulated over the selection rounds of a Lightning run.

    Each round is a checkpoint: its term is ``learning_rate * g(z)^T u`` with the learning rate the caller sets
    (:class:`~lightning_chips.DataSelectionCallback` sets the optimizer's current one) and is added to the
    pair's total from earlier rounds (kept by id, O(N) floats, in :meth:`state_dict`). Offline over a list of
    checkpoints: :func:`lightning_chips.functional.influence.tracin_scores`.
    """

    name: ClassVar[str] = "tracin"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._past_ids = torch.zeros(0, dtype=torch.int64)
        self._past_totals = torch.zeros(0, dtype=torch.float64)
        self._pending: list[tuple[Tensor, Tensor]] = []

    def prepare(
        self,
        endpoint: EndPoint,
        target: PairFeatures | None,
        pool_sample: PairFeatures,
        context: RoundContext | None = None,
    ) -> None:
        self._commit()
        super().prepare(endpoint, target, pool_sample, context)

    def _commit(self) -> None:
        """Fold the totals scored in the previous round into the history."""
        if not self._pending:
            return
        ids = torch.cat([p[0] for p in self._pending])
        totals = torch.cat([p[1] for p in self._pending])
        keep = ~torch.isin(self._past_ids, ids)
        ids, totals = torch.cat([self._past_ids[keep], ids]), torch.cat([self._past_totals[keep], totals])
        order = torch.argsort(ids)
        self._past_ids, self._past_totals, self._pending = ids[order], totals[order], []

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
        self._commit()
        return {"ids": self._past_ids.clone(), "totals": self._past_totals.clone()}

    def load_state_dict(self, state: dict) -> None:
        self._past_ids, self._past_totals, self._pending = state["ids"].long(), state["totals"].double(), []
