"""The scoring steps of a selection round, shared by :class:`~lightning_chips.DataSelectionCallback` and
``lightning-chips score`` (:mod:`lightning_chips.offline`): both prepare and score through these functions, so a
round behaves the same through either entry point (docs/selection.md, "One round").

* :func:`prepare_scorer`: ``scorer.prepare`` on the target and the pool sample in id order (the prepared state
  depends on which pairs were given, not on the order they were read in), on the scoring device, outside inference
  mode and with autograd on (some scorers train in ``prepare``: CLIP-powered's adapters, the plausibility
  reference).
* :func:`score_batch`: one batch's scores as float32 on the CPU; NaN or inf is a ``FloatingPointError`` naming the
  scorer, the round and the first ids, whichever entry point scores.

The callers keep what differs between them: the callback its schedule, DDP gathers and round files; ``score`` its
per-shard part files and merge.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_chips.endpoint import EndPoint
from lightning_chips.features import PairFeatures
from lightning_chips.scoring import RoundContext, Scorer

__all__ = ["prepare_scorer", "score_batch"]


def _ordinary(features: PairFeatures) -> PairFeatures:
    """A copy made outside inference mode (inference tensors cannot enter autograd)."""
    labels = None if features.labels is None else features.labels.clone()
    return PairFeatures(features.ids.clone(), features.image.clone(), features.text.clone(), labels)


def prepare_scorer(
    scorer: Scorer,
    endpoint: EndPoint,
    target: PairFeatures | None,
    pool_sample: PairFeatures,
    context: RoundContext,
    device: torch.device | str,
) -> None:
    """Prepare ``scorer`` for a round: id-ordered inputs on ``device``, ordinary tensors, autograd on.

    Example::

        >>> prepare_scorer(CHIPS(), adapter.endpoint(), target, sample, RoundContext(round=2), "cuda")  # doctest: +SKIP
    """
    with torch.inference_mode(False), torch.enable_grad():
        target = None if target is None else _ordinary(target.sorted_by_id().to(device))
        scorer.prepare(endpoint, target, _ordinary(pool_sample.sorted_by_id().to(device)), context)


def score_batch(scorer: Scorer, batch: PairFeatures) -> Tensor:
    """``[B]`` float32 CPU scores of a batch of pool pairs.

    Raises:
        FloatingPointError: NaN or inf scores, naming the scorer, the round and the first ids (a diverged model).
    """
    scores = scorer.score(batch).float().cpu()
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        first = batch.ids.cpu()[~finite][:5].tolist()
        raise FloatingPointError(
            f"{type(scorer).__name__} gave non-finite scores in round {scorer.round} (first ids: {first}); the model "
            "or the features are diverged."
        )
    return scores
