"""CLIP-powered selection (Yang et al., ICLR 2025): semantic alignment + diversity under an exact budget.

With image adapter ``A_I`` and text adapter ``A_T`` (two separate linear layers, identity-initialised and trained
on the pool with InfoNCE between each image and its label's prompt embedding):

* ``SAS_i = cos(A_I(x_i), A_T(t_{label_i}))`` (semantic alignment);
* ``SDS_i`` = mean cosine distance **[ours: the paper's distance is not pinned down]** from ``A_I(x_i)`` to its
  ``K - 1`` nearest neighbours in the same class (diversity; ``K = 50``);
* both min-max normalised; ``c_i = SAS_i / mean(SAS) + 0.1 * SDS_i / mean(SDS)``.

The paper optimises a sigmoid mask with the loss ``-mean(m SAS/mean SAS) - 0.1 mean(m SDS/mean SDS)
+ 2 |sum STE(m) - k| / N``; its optimum is the top-k of ``c`` (up to samples with ``c > 2``, which are never
dropped). ``optimizer="closed_form"`` (default) returns that top-k; ``"sgd"`` runs the mask optimisation and
returns the ``k`` largest mask values, so the budget is exact either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ClipPoweredScores", "clip_powered_scores", "clip_powered_select"]


@dataclass
class ClipPoweredScores:
    """``sas`` and ``sds`` (min-max normalised) and the combined score ``c`` (each ``[N]``)."""

    sas: Tensor
    sds: Tensor
    combined: Tensor


def _minmax(v: Tensor) -> Tensor:
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else torch.zeros_like(v)


def _train_adapters(
    image_emb: Tensor, class_text_emb: Tensor, labels: Tensor, *, epochs: int, lr: float, temperature: float, seed: int
) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    e = image_emb.shape[1]
    torch.manual_seed(seed)
    a_i, a_t = torch.nn.Linear(e, e).double(), torch.nn.Linear(e, e).double()
    for adapter in (a_i, a_t):
        torch.nn.init.eye_(adapter.weight)
        torch.nn.init.zeros_(adapter.bias)
    if epochs == 0:
        return a_i, a_t
    optimizer = torch.optim.Adam([*a_i.parameters(), *a_t.parameters()], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    x, t = image_emb.double(), class_text_emb.double()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(256):
            logits = F.normalize(a_i(x[idx]), dim=1) @ F.normalize(a_t(t), dim=1).T / temperature
            loss = F.cross_entropy(logits, labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return a_i, a_t


@torch.no_grad()
def _scores(image: Tensor, text: Tensor, labels: Tensor, neighbours: int, diversity_weight: float) -> ClipPoweredScores:
    sas = (image * text[labels]).sum(1)
    sds = torch.zeros(len(image), dtype=image.dtype)
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        if len(members) < 2:
            continue
        dist = 1.0 - image[members] @ image[members].T
        dist.fill_diagonal_(float("inf"))
        k = min(neighbours - 1, len(members) - 1)
        sds[members] = dist.topk(k, dim=1, largest=False).values.mean(1)
    sas, sds = _minmax(sas), _minmax(sds)
    combined = sas / sas.mean().clamp(min=1e-12) + diversity_weight * sds / sds.mean().clamp(min=1e-12)
    return ClipPoweredScores(sas, sds, combined)


def clip_powered_scores(
    image_emb: Tensor,
    class_text_emb: Tensor,
    labels: Tensor,
    *,
    train_adapters: bool = True,
    adapter_epochs: int = 5,
    adapter_lr: float = 1e-3,
    temperature: float = 0.07,
    neighbours: int = 50,
    diversity_weight: float = 0.1,
    seed: int = 0,
) -> ClipPoweredScores:
    """SAS, SDS and the combined score of every pool image (see the module docstring).

    Args:
        image_emb: ``[N, e]`` normalised image embeddings.
        class_text_emb: ``[C, e]`` normalised prompt embeddings (``"a photo of a {label}"``), one per class.
        labels: ``[N]`` class index (or pseudo-label) of each image.
        train_adapters: train the two adapters on the pool first (identity adapters otherwise).
        adapter_epochs: adapter training epochs.
        adapter_lr: adapter learning rate (Adam).
        temperature: InfoNCE temperature of the adapter training.
        neighbours: ``K`` of the diversity score.
        diversity_weight: weight of SDS in the combined score (paper: 0.1).
        seed: seed of the adapter training.
    """
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= len(class_text_emb):
        raise ValueError(f"labels must index the {len(class_text_emb)} class prompts.")
    a_i, a_t = _train_adapters(image_emb, class_text_emb, labels, epochs=adapter_epochs if train_adapters else 0,
                               lr=adapter_lr, temperature=temperature, seed=seed)  # fmt: skip
    with torch.no_grad():
        image = F.normalize(a_i(image_emb.double()), dim=1)
        text = F.normalize(a_t(class_text_emb.double()), dim=1)
    return _scores(image, text, labels, neighbours, diversity_weight)


def clip_powered_select(
    image_emb: Tensor,
    class_text_emb: Tensor,
    labels: Tensor,
    budget: int,
    *,
    optimizer: Literal["closed_form", "sgd"] = "closed_form",
    sgd_steps: int = 500,
    sgd_lr: float = 0.05,
    seed: int = 0,
    **score_kwargs,
) -> Tensor:
    """Sorted indices of exactly ``budget`` pairs (closed-form top-k of ``c`` or the SGD mask's top-k)."""
    if not 1 <= budget <= len(labels):
        raise ValueError(f"`budget` must be in [1, {len(labels)}], got {budget}.")
    scores = clip_powered_scores(image_emb, class_text_emb, labels, seed=seed, **score_kwargs)
    if optimizer == "closed_form":
        ranking = scores.combined
    elif optimizer == "sgd":
        ranking = _sgd_mask(scores, budget, steps=sgd_steps, lr=sgd_lr, seed=seed)
    else:
        raise ValueError(f"`optimizer` must be 'closed_form' or 'sgd', got {optimizer!r}.")
    order = torch.argsort(ranking, descending=True, stable=True)
    return order[:budget].sort().values


def _sgd_mask(scores: ClipPoweredScores, budget: int, *, steps: int, lr: float, seed: int) -> Tensor:
    """The paper's sigmoid-mask optimisation with a straight-through budget penalty; returns the mask values."""
    n = len(scores.sas)
    sas = scores.sas / scores.sas.mean().clamp(min=1e-12)
    sds = scores.sds / scores.sds.mean().clamp(min=1e-12)
    generator = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(n, generator=generator, dtype=torch.float64)).requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        m = torch.sigmoid(w)
        hard = (m > 0.5).double()
        ste = hard + m - m.detach()
        loss = -(m * sas).mean() - 0.1 * (m * sds).mean() + 2.0 * (ste.sum() - budget).abs() / n
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.sigmoid(w).detach()
