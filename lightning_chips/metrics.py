"""Zero-shot evaluation as torchmetrics: classification accuracy and CLIP-style retrieval recall@k.

The classes hold the state; :mod:`lightning_chips.functional.zero_shot` computes (its functions give the same
numbers from tensors at hand).

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
from lightning_chips.functional.zero_shot import (
    check_ks,
    check_retrieval_ids,
    first_occurrence,
    retrieval_hits,
    retrieval_recall_from_hits,
    zero_shot_accuracy_from_counts,
    zero_shot_counts,
    zero_shot_hits,
)

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


def _add_counts(states: list[Tensor], counts: tuple[Tensor, int, Tensor, Tensor]) -> None:
    """Add :func:`~lightning_chips.functional.zero_shot.zero_shot_counts` into the count tensors, in place."""
    for state, count in zip(states, counts, strict=True):
        state += count


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
        self.top_k = check_ks(top_k, "top_k")
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

    def update(self, image_embeddings: Tensor, target: Tensor, ids: Tensor | None = None) -> None:
        """Add a batch of image embeddings ``[B, e]`` with class targets ``[B]`` (and optional sample ids)."""
        target = target.long()
        if self.classifier.device != image_embeddings.device:
            self.classifier = self.classifier.to(image_embeddings.device)
        hits = zero_shot_hits(image_embeddings, target, self.classifier, self.top_k)
        if ids is not None:
            self.sample_ids.append(ids.long())
            self.sample_hits.append(hits)
            self.sample_targets.append(target)
            return
        _add_counts([self.correct, self.total, self.class_correct, self.class_total],
                    zero_shot_counts(hits, target, self.num_classes))  # fmt: skip

    def compute(self) -> dict[str, Tensor]:
        counts = [self.correct.clone(), self.total.clone(), self.class_correct.clone(), self.class_total.clone()]
        if isinstance(self.sample_ids, Tensor) or self.sample_ids:
            keep = first_occurrence(dim_zero_cat(self.sample_ids))
            hits, targets = dim_zero_cat(self.sample_hits)[keep], dim_zero_cat(self.sample_targets)[keep]
            _add_counts(counts, zero_shot_counts(hits, targets, self.num_classes))
        return zero_shot_accuracy_from_counts(*counts, self.top_k)


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
        k = check_ks(k, "k")
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
        self.k, self.chunk_size = k, chunk_size
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
        check_retrieval_ids(image_embeddings, image_ids, text_embeddings, text_image_ids)
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
        keep = first_occurrence(image_ids)
        images, image_ids = images[keep], image_ids[keep]
        if (text_ids >= 0).all():
            keep_t = first_occurrence(text_ids)
        else:
            rows = torch.cat([text_image_ids[:, None].double(), texts.double()], dim=1)
            _, inverse = torch.unique(rows, dim=0, return_inverse=True)
            keep_t = first_occurrence(inverse)
        return images, image_ids, texts[keep_t], text_image_ids[keep_t]

    def compute(self) -> dict[str, Tensor]:
        images, image_ids, texts, text_image_ids = self._deduplicated()
        if images.shape[0] == 0 or texts.shape[0] == 0:
            raise ValueError("RetrievalRecallAtK.compute() needs at least one image and one caption.")
        t2i = retrieval_hits(texts, text_image_ids, images, image_ids, max(self.k), self.chunk_size)
        i2t = retrieval_hits(images, image_ids, texts, text_image_ids, max(self.k), self.chunk_size)
        return retrieval_recall_from_hits(t2i, i2t, self.k)
