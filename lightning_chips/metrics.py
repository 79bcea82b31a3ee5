"""Zero-shot evaluation as torchmetrics: classification accuracy and CLIP-style retrieval recall@k.

Semantics follow clip_benchmark (metric names ``acc1``, ``acc5``, ``mean_per_class_recall``,
``image_retrieval_recall@k``, ``text_retrieval_recall@k``); conventions follow torchmetrics (``update`` mutates
state only, ``compute`` is pure, explicit ``dist_reduce_fx``).

DDP: a distributed sampler pads the last batch with repeated samples. Pass sample ``ids`` to ``update`` and
duplicates are dropped after the cross-rank sync, so the numbers equal the single-process ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_chips.adapters import CLIPAdapter, resolve_adapter

__all__ = ["PromptEncoder", "RetrievalRecallAtK", "ZeroShotAccuracy", "build_zero_shot_classifier", "format_prompts"]

Template = str | Callable[[str], str]


def format_prompts(classname: str, templates: Sequence[Template]) -> list[str]:
    """``templates`` applied to ``classname``: ``str.format`` strings with ``{}`` or ``{c}``, or callables."""
    prompts = []
    for template in templates:
        prompts.append(template(classname) if callable(template) else template.format(classname, c=classname))
    return prompts


@torch.no_grad()
def build_zero_shot_classifier(
    model: Any,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Zero-shot classifier weights ``[e, C]``: per class, the normalised text embeddings of every template,
    averaged and renormalised (CLIP's prompt ensembling).

    Args:
        model: a :class:`~lightning_chips.adapters.CLIPAdapter` or anything :func:`resolve_adapter` accepts.
        tokenizer: maps a list of prompts to token ids.
        classnames: the ``C`` class names.
        templates: prompt templates (``"a photo of a {}."``, ``"a {c} under the microscope"``, or callables).

    Example::

        >>> import open_clip
        >>> cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
        ...        "patch_size": 8}, "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64,
        ...        "heads": 2, "layers": 2}}
        >>> tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
        >>> w = build_zero_shot_classifier(open_clip.CLIP(**cfg), tokenizer, ["circle", "star"], ["a drawing of a {}."])
        >>> w.shape
        torch.Size([32, 2])
    """
    if not classnames:
        raise ValueError("`classnames` is empty: a zero-shot classifier needs at least one class.")
    if not templates:
        raise ValueError("`templates` is empty: pass at least one prompt template such as 'a photo of a {}.'.")
    _require_tokenizer(tokenizer, classnames)
    adapter = model if isinstance(model, CLIPAdapter) else resolve_adapter(model)
    module = adapter.module
    device = device if device is not None else next(module.parameters()).device
    was_training = module.training
    module.eval()
    try:
        weights = []
        for name in classnames:
            tokens = tokenizer(format_prompts(name, templates)).to(device)
            embeddings = F.normalize(adapter.encode_text(tokens).float(), dim=-1)
            weights.append(F.normalize(embeddings.mean(0), dim=0))
    finally:
        module.train(was_training)
    return torch.stack(weights, dim=1)


def _require_tokenizer(tokenizer: Callable[[list[str]], Tensor] | None, prompts: Sequence[str]) -> None:
    """Prompts are strings: without a tokenizer (None, or a :class:`~lightning_chips.data.preprocess.
    MissingTokenizer` for a model that has none) embedding them is an error that says what to pass."""
    from lightning_chips.data.preprocess import MissingTokenizer

    if tokenizer is None or isinstance(tokenizer, MissingTokenizer):
        shown = ", ".join(repr(p) for p in list(prompts)[:3]) + (", ..." if len(prompts) > 3 else "")
        reason = tokenizer.message if tokenizer is not None else "No tokenizer was given."
        raise ValueError(f"Embedding the prompts ({shown}) needs a tokenizer. {reason}")


def _first_occurrence(ids: Tensor) -> Tensor:
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


class PromptEncoder:
    """Prompts -> normalised text embeddings ``[P, e]`` with the current model (eval mode, no grad): the
    ``text_encoder`` a selection round gives scorers that embed class prompts (CLIP-powered, ClipCov zero-shot).
    Prompts are strings: a call without a tokenizer (None, or the
    :class:`~lightning_chips.data.preprocess.MissingTokenizer` of a model that has none) is a ``ValueError`` that says
    what to pass.

    Example::

        >>> encode = PromptEncoder(resolve_adapter(model), tokenizer)  # doctest: +SKIP
        >>> encode(["a photo of a dog.", "a photo of a cat."]).shape  # doctest: +SKIP
        torch.Size([2, 512])
    """

    def __init__(self, adapter: CLIPAdapter, tokenizer: Callable[[list[str]], Tensor]) -> None:
        self.adapter, self.tokenizer = adapter, tokenizer

    def __call__(self, prompts: list[str]) -> Tensor:
        _require_tokenizer(self.tokenizer, prompts)
        return build_zero_shot_classifier(self.adapter, self.tokenizer, prompts, ["{}"]).T


class ZeroShotAccuracy(Metric):
    """Zero-shot top-k accuracy and mean per-class recall of image embeddings against a classifier ``[e, C]``.

    ``compute()`` returns ``{"acc1", "acc5", ..., "mean_per_class_recall"}``; ``acc{k}`` is NaN when there are
    fewer than ``k`` classes (as clip_benchmark reports it). Without ``ids``, samples accumulate in sum states;
    with ``ids``, per-sample results are kept and de-duplicated by id after the sync (DDP padding).

    Example::

        >>> metric = ZeroShotAccuracy(torch.eye(3), top_k=(1,))
        >>> metric.update(torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]), torch.tensor([0, 1]))
        >>> {k: round(float(v), 2) for k, v in metric.compute().items()}
        {'acc1': 0.5, 'mean_per_class_recall': 0.5}
    """

    higher_is_better = True
    full_state_update = False
    is_differentiable = False

    def __init__(self, classifier: Tensor, top_k: Sequence[int] = (1, 5), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if classifier.dim() != 2:
            raise ValueError(f"`classifier` must be [embed_dim, num_classes], got shape {tuple(classifier.shape)}.")
        if not top_k or any(int(k) < 1 for k in top_k):
            raise ValueError(f"`top_k` must be a non-empty sequence of integers >= 1, got {top_k}.")
        self.top_k = tuple(int(k) for k in top_k)
        self.num_classes = int(classifier.shape[1])
        # A plain float32 attribute, not a buffer: module dtype casts (precision="bf16-true") must not round it.
        self.classifier = F.normalize(classifier.detach().float(), dim=0)
        # Integer counts: exact, and untouched by floating-point dtype casts of a parent module.
        self.add_state("correct", torch.zeros(len(self.top_k), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("class_correct", torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("class_total", torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("sample_ids", [], dist_reduce_fx="cat")
        self.add_state("sample_hits", [], dist_reduce_fx="cat")
        self.add_state("sample_targets", [], dist_reduce_fx="cat")

    def _hits(self, image_embeddings: Tensor, target: Tensor) -> Tensor:
        if self.classifier.device != image_embeddings.device:
            self.classifier = self.classifier.to(image_embeddings.device)
        logits = F.normalize(image_embeddings.float(), dim=-1) @ self.classifier
        k_max = min(max(self.top_k), self.num_classes)
        top = logits.topk(k_max, dim=1).indices
        matches = top == target[:, None]
        return torch.stack([matches[:, : min(k, k_max)].any(1) for k in self.top_k], dim=1)

    def update(self, image_embeddings: Tensor, target: Tensor, ids: Tensor | None = None) -> None:
        """Add a batch of image embeddings ``[B, e]`` with class targets ``[B]`` (and optional sample ids)."""
        target = target.long()
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(f"targets must be class indices in [0, {self.num_classes}), got {target.tolist()[:8]}.")
        hits = self._hits(image_embeddings, target)
        if ids is not None:
            self.sample_ids.append(ids.long())
            self.sample_hits.append(hits)
            self.sample_targets.append(target)
            return
        self.correct += hits.long().sum(0)
        self.total += target.numel()
        self.class_total += torch.bincount(target, minlength=self.num_classes)
        self.class_correct += torch.bincount(target[hits[:, 0]], minlength=self.num_classes)

    def compute(self) -> dict[str, Tensor]:
        correct, total = self.correct.clone(), self.total.clone()
        class_correct, class_total = self.class_correct.clone(), self.class_total.clone()
        if isinstance(self.sample_ids, Tensor) or self.sample_ids:
            ids = dim_zero_cat(self.sample_ids)
            keep = _first_occurrence(ids)
            hits, targets = dim_zero_cat(self.sample_hits)[keep], dim_zero_cat(self.sample_targets)[keep]
            correct += hits.long().sum(0)
            total += targets.numel()
            class_total += torch.bincount(targets, minlength=self.num_classes)
            class_correct += torch.bincount(targets[hits[:, 0]], minlength=self.num_classes)
        out = {}
        for i, k in enumerate(self.top_k):
            out[f"acc{k}"] = correct[i] / total if k <= self.num_classes else torch.tensor(float("nan"))
        seen = class_total > 0
        out["mean_per_class_recall"] = (class_correct[seen].double() / class_total[seen]).mean().float()
        out = {key: value.float() for key, value in out.items()}
        return out


class RetrievalRecallAtK(Metric):
    """CLIP-paper retrieval recall@k: the share of queries with *any* positive among their top ``k`` results.

    ``image_retrieval_recall@k``: text queries retrieving images (a hit if the caption's image is in the top k).
    ``text_retrieval_recall@k``: image queries retrieving captions (a hit if any of its captions is in the top
    k). Several captions per image are allowed. This is a hit rate, not torchmetrics' ``RetrievalRecall``
    (the share of *all* relevant items retrieved, which is lower with several captions per image).

    Images are de-duplicated by id and captions by non-negative ``text_ids`` (or, without them, by identical
    (image id, embedding)) after the sync. ``compute`` ranks in chunks of ``chunk_size`` queries, so 50k x 50k
    never needs the full similarity matrix at once.
    """

    higher_is_better = True
    full_state_update = False
    is_differentiable = False

    def __init__(self, k: Sequence[int] = (1, 5, 10), chunk_size: int = 1024, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not k or any(int(x) < 1 for x in k):
            raise ValueError(f"`k` must be a non-empty sequence of integers >= 1, got {k}.")
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
        self.k, self.chunk_size = tuple(int(x) for x in k), chunk_size
        for name in ("image_embeddings", "image_ids", "text_embeddings", "text_image_ids", "text_ids"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(
        self,
        image_embeddings: Tensor,
        image_ids: Tensor,
        text_embeddings: Tensor,
        text_image_ids: Tensor,
        text_ids: Tensor | None = None,
    ) -> None:
        """Add images ``[B, e]`` with ids ``[B]`` and captions ``[T, e]`` with their image's id ``[T]``."""
        if image_embeddings.shape[0] != image_ids.shape[0] or text_embeddings.shape[0] != text_image_ids.shape[0]:
            raise ValueError("Each image needs one id and each caption one image id (first dimensions must match).")
        self.image_embeddings.append(F.normalize(image_embeddings.float(), dim=-1))
        self.image_ids.append(image_ids.long())
        self.text_embeddings.append(F.normalize(text_embeddings.float(), dim=-1))
        self.text_image_ids.append(text_image_ids.long())
        if text_ids is not None and text_ids.numel() and int(text_ids.min()) < 0:
            raise ValueError("`text_ids` must be non-negative (-1 is reserved for 'no caption id').")
        self.text_ids.append(torch.full_like(text_image_ids.long(), -1) if text_ids is None else text_ids.long())

    def _deduplicated(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        images, image_ids = dim_zero_cat(self.image_embeddings), dim_zero_cat(self.image_ids)
        texts, text_image_ids = dim_zero_cat(self.text_embeddings), dim_zero_cat(self.text_image_ids)
        text_ids = dim_zero_cat(self.text_ids)
        keep = _first_occurrence(image_ids)
        images, image_ids = images[keep], image_ids[keep]
        if (text_ids >= 0).all():
            keep_t = _first_occurrence(text_ids)
        else:
            rows = torch.cat([text_image_ids[:, None].double(), texts.double()], dim=1)
            _, inverse = torch.unique(rows, dim=0, return_inverse=True)
            keep_t = _first_occurrence(inverse)
        return images, image_ids, texts[keep_t], text_image_ids[keep_t]

    def _hits(self, queries: Tensor, query_ids: Tensor, keys: Tensor, key_ids: Tensor) -> Tensor:
        """``[Q, min(max k, K)]``: whether the j-th ranked key shares the query's image id (chunked over queries)."""
        k = min(max(self.k), keys.shape[0])
        hits = []
        for start in range(0, queries.shape[0], self.chunk_size):
            top = (queries[start : start + self.chunk_size] @ keys.T).topk(k, dim=1).indices
            hits.append(key_ids[top] == query_ids[start : start + self.chunk_size, None])
        return torch.cat(hits)

    def compute(self) -> dict[str, Tensor]:
        images, image_ids, texts, text_image_ids = self._deduplicated()
        if images.shape[0] == 0 or texts.shape[0] == 0:
            raise ValueError("RetrievalRecallAtK.compute() needs at least one image and one caption.")
        out: dict[str, Tensor] = {}
        t2i = self._hits(texts, text_image_ids, images, image_ids)
        i2t = self._hits(images, image_ids, texts, text_image_ids)
        k_img, k_txt = t2i.shape[1], i2t.shape[1]
        for k in self.k:
            out[f"image_retrieval_recall@{k}"] = t2i[:, : min(k, k_img)].any(1).float().mean()
            out[f"text_retrieval_recall@{k}"] = i2t[:, : min(k, k_txt)].any(1).float().mean()
        return out
