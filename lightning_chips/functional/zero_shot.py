"""Zero-shot metrics as pure functions: top-k accuracy and mean per-class recall of a zero-shot classifier, and
CLIP-style retrieval recall@k.

torchmetrics' convention: these compute, the classes of :mod:`lightning_chips.metrics` hold the state (sums, or
per-sample results de-duplicated by id after a DDP sync) and call them. Semantics follow clip_benchmark
(docs/evaluation.md): ``acc{k}`` is the share of images whose class is among the classifier's top ``k`` (NaN with
fewer than ``k`` classes), ``mean_per_class_recall`` the mean over the classes seen of their top-1 recall;
``image_retrieval_recall@k`` the share of captions whose image is among their top ``k`` images,
``text_retrieval_recall@k`` the share of images with any of their captions among their top ``k`` captions (a hit
rate, not torchmetrics' ``RetrievalRecall``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "first_occurrence",
    "retrieval_hits",
    "retrieval_recall_at_k",
    "retrieval_recall_from_hits",
    "zero_shot_accuracy",
    "zero_shot_accuracy_from_counts",
    "zero_shot_counts",
    "zero_shot_hits",
]


def zero_shot_hits(image_embeddings: Tensor, target: Tensor, classifier: Tensor, top_k: Sequence[int]) -> Tensor:
    """``[B, len(top_k)]``: whether each image's class ``target`` (``[B]`` class indices) is among the top ``k``
    classes of its cosine logits ``normalize(x) @ classifier``, for each ``k``.

    ``classifier`` is ``[e, C]`` float32 with unit columns (:func:`zero_shot_accuracy` normalises it).

    Raises:
        ValueError: a target outside ``[0, C)``.
    """
    num_classes = classifier.shape[1]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"targets must be class indices in [0, {num_classes}), got {target.tolist()[:8]}.")
    logits = F.normalize(image_embeddings.float(), dim=-1) @ classifier
    k_max = min(max(top_k), num_classes)
    top = logits.topk(k_max, dim=1).indices
    matches = top == target[:, None]
    return torch.stack([matches[:, : min(k, k_max)].any(1) for k in top_k], dim=1)


def zero_shot_counts(hits: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, int, Tensor, Tensor]:
    """``(correct [len(top_k)], total, class_correct [C], class_total [C])`` of :func:`zero_shot_hits`: the sums
    :func:`zero_shot_accuracy_from_counts` reads (integer counts: exact, and additive across batches and ranks)."""
    return (
        hits.long().sum(0),
        target.numel(),
        torch.bincount(target[hits[:, 0]], minlength=num_classes),
        torch.bincount(target, minlength=num_classes),
    )


def zero_shot_accuracy_from_counts(
    correct: Tensor, total: Tensor | int, class_correct: Tensor, class_total: Tensor, top_k: Sequence[int]
) -> dict[str, Tensor]:
    """``{"acc1", "acc5", ..., "mean_per_class_recall"}`` (float32) from the counts of :func:`zero_shot_counts`;
    ``acc{k}`` is NaN when there are fewer than ``k`` classes."""
    num_classes = class_total.shape[0]
    out = {}
    for i, k in enumerate(top_k):
        out[f"acc{k}"] = correct[i] / total if k <= num_classes else torch.tensor(float("nan"))
    seen = class_total > 0
    out["mean_per_class_recall"] = (class_correct[seen].double() / class_total[seen]).mean().float()
    return {key: value.float() for key, value in out.items()}


def zero_shot_accuracy(
    image_embeddings: Tensor, target: Tensor, classifier: Tensor, top_k: Sequence[int] = (1, 5)
) -> dict[str, Tensor]:
    """Zero-shot top-k accuracy and mean per-class recall of image embeddings ``[B, e]`` with class targets ``[B]``
    against a classifier ``[e, C]`` (:func:`~lightning_chips.metrics.build_zero_shot_classifier`; its columns are
    normalised here): what :class:`~lightning_chips.metrics.ZeroShotAccuracy` computes over the same samples.

    Example::

        >>> out = zero_shot_accuracy(torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]), torch.tensor([0, 1]), torch.eye(3),
        ...                          top_k=(1,))
        >>> {k: round(float(v), 2) for k, v in out.items()}
        {'acc1': 0.5, 'mean_per_class_recall': 0.5}
    """
    top_k = check_ks(top_k, "top_k")
    if classifier.dim() != 2:
        raise ValueError(f"`classifier` must be [embed_dim, num_classes], got shape {tuple(classifier.shape)}.")
    classifier = F.normalize(classifier.detach().float(), dim=0).to(image_embeddings.device)
    target = target.long()
    hits = zero_shot_hits(image_embeddings, target, classifier, top_k)
    return zero_shot_accuracy_from_counts(*zero_shot_counts(hits, target, classifier.shape[1]), top_k)


def first_occurrence(ids: Tensor) -> Tensor:
    """Boolean mask keeping the first occurrence of every id."""
    if ids.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=ids.device)
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    first_sorted = torch.ones_like(sorted_ids, dtype=torch.bool)
    first_sorted[1:] = sorted_ids[1:] != sorted_ids[:-1]
    keep = torch.zeros_like(first_sorted)
    keep[order] = first_sorted
    return keep


def retrieval_hits(
    queries: Tensor, query_ids: Tensor, keys: Tensor, key_ids: Tensor, k: int, chunk_size: int
) -> Tensor:
    """``[Q, min(k, K)]``: whether the j-th ranked key (by ``queries @ keys.T``) shares the query's image id, ranked
    in chunks of ``chunk_size`` queries (never the full ``Q x K`` similarity matrix at once)."""
    k = min(k, keys.shape[0])
    hits = []
    for start in range(0, queries.shape[0], chunk_size):
        top = (queries[start : start + chunk_size] @ keys.T).topk(k, dim=1).indices
        hits.append(key_ids[top] == query_ids[start : start + chunk_size, None])
    return torch.cat(hits)


def retrieval_recall_from_hits(t2i: Tensor, i2t: Tensor, k: Sequence[int]) -> dict[str, Tensor]:
    """``{"image_retrieval_recall@k", "text_retrieval_recall@k"}`` for each ``k`` from the ranked hits of the text
    queries (``t2i``) and of the image queries (``i2t``) of :func:`retrieval_hits`."""
    out: dict[str, Tensor] = {}
    k_img, k_txt = t2i.shape[1], i2t.shape[1]
    for kk in k:
        out[f"image_retrieval_recall@{kk}"] = t2i[:, : min(kk, k_img)].any(1).float().mean()
        out[f"text_retrieval_recall@{kk}"] = i2t[:, : min(kk, k_txt)].any(1).float().mean()
    return out


def retrieval_recall_at_k(
    image_embeddings: Tensor,
    image_ids: Tensor,
    text_embeddings: Tensor,
    text_image_ids: Tensor,
    k: Sequence[int] = (1, 5, 10),
    *,
    chunk_size: int = 1024,
) -> dict[str, Tensor]:
    """CLIP-paper retrieval recall@k of images ``[N, e]`` with ids ``[N]`` and captions ``[T, e]`` with their image's
    id ``[T]`` (several captions per image allowed; each image and caption given once): what
    :class:`~lightning_chips.metrics.RetrievalRecallAtK` computes over the same (de-duplicated) samples. The
    embeddings are L2-normalised here (in float32).

    Example::

        >>> images = torch.eye(3)
        >>> texts = torch.tensor([[1.0, 0, 0], [0, 0.6, 0.8], [0, 0.8, 0.6]])  # captions of images 0, 1, 2
        >>> out = retrieval_recall_at_k(images, torch.arange(3), texts, torch.arange(3), k=(1, 2))
        >>> [round(float(v), 2) for v in out.values()]  # image@1, text@1, image@2, text@2
        [0.33, 0.33, 1.0, 1.0]
    """
    k = check_ks(k, "k")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
    check_retrieval_ids(image_embeddings, image_ids, text_embeddings, text_image_ids)
    if image_embeddings.shape[0] == 0 or text_embeddings.shape[0] == 0:
        raise ValueError("retrieval_recall_at_k needs at least one image and one caption.")
    images, texts = F.normalize(image_embeddings.float(), dim=-1), F.normalize(text_embeddings.float(), dim=-1)
    image_ids, text_image_ids = image_ids.long(), text_image_ids.long()
    t2i = retrieval_hits(texts, text_image_ids, images, image_ids, max(k), chunk_size)
    i2t = retrieval_hits(images, image_ids, texts, text_image_ids, max(k), chunk_size)
    return retrieval_recall_from_hits(t2i, i2t, k)


def check_retrieval_ids(
    image_embeddings: Tensor, image_ids: Tensor, text_embeddings: Tensor, text_image_ids: Tensor
) -> None:
    """Each image needs one id and each caption one image id."""
    if image_embeddings.shape[0] != image_ids.shape[0] or text_embeddings.shape[0] != text_image_ids.shape[0]:
        raise ValueError("Each image needs one id and each caption one image id (first dimensions must match).")


def check_ks(ks: Sequence[int], name: str) -> tuple[int, ...]:
    if not ks or any(int(x) < 1 for x in ks):
        raise ValueError(f"`{name}` must be a non-empty sequence of integers >= 1, got {ks}.")
    return tuple(int(x) for x in ks)
