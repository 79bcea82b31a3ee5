"""Embedding-quality scorers: CLIPScore, negCLIPLoss, NormSim (docs/methods.md: CLIPScore, negCLIPLoss, NormSim)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_chips.endpoint import EndPoint
from lightning_chips.features import PairFeatures
from lightning_chips.functional.quality import clip_score, negclip_loss, negsiglip_loss, normsim, sigmoid_threshold
from lightning_chips.metrics import format_prompts
from lightning_chips.scoring.base import (
    IdLookup,
    Scorer,
    choice_setting,
    integer_setting,
    real_setting,
    strings_setting,
)

__all__ = [
    "CLIPScore",
    "CLIPScoreArguments",
    "ClipCov",
    "ClipCovArguments",
    "ClipPowered",
    "ClipPoweredArguments",
    "NegCLIPLoss",
    "NegCLIPLossArguments",
    "NormSim",
    "NormSimArguments",
]

_CLASSES = ("kmeans", "labels", "zeroshot")
_TEMPLATES = ("a photo of a {}.",)


class _EmbeddingScorer(Scorer):
    """Keeps a detached snapshot of the end point to embed pre-projection features."""

    endpoint: EndPoint | None = None
    reads_pool_sample: ClassVar[bool] = True
    """Whether :meth:`prepare` computes from the pool sample (set-level scorers) or only keeps the end point."""

    def prepare_round(self, endpoint: EndPoint, target: PairFeatures | None, pool_sample: PairFeatures) -> None:
        self.endpoint = endpoint.detach()

    def _embed(self, batch: PairFeatures) -> tuple[Tensor, Tensor]:
        if self.endpoint is None:
            raise RuntimeError(f"{type(self).__name__}.score called before prepare().")
        ep = self.endpoint
        dtype, device = ep.image_proj.dtype, ep.image_proj.device
        return ep.embed_image(batch.image.to(device, dtype)), ep.embed_text(batch.text.to(device, dtype))


@dataclass(frozen=True)
class CLIPScoreArguments:
    """The settings of :class:`CLIPScore`: none (it scores with the current model alone)."""


class CLIPScore(_EmbeddingScorer):
    """CLIPScore ``cos(x, y)`` of each pair with the current model (needs no target)."""

    name: ClassVar[str] = "clipscore"
    requires_target = False
    reads_pool_sample: ClassVar[bool] = False

    def __init__(self) -> None:
        self.arguments = CLIPScoreArguments()

    def score(self, batch: PairFeatures) -> Tensor:
        x, y = self._embed(batch)
        return clip_score(x, y)


@dataclass(frozen=True)
class NormSimArguments:
    """The settings of :class:`NormSim` (validated once when built).

    Args:
        p: ``2.0`` or ``float("inf")``.

    Raises:
        ValueError: any other ``p``.
    """

    p: float = math.inf

    def __post_init__(self) -> None:
        if isinstance(self.p, bool) or not isinstance(self.p, int | float) or float(self.p) not in (2.0, math.inf):
            raise ValueError(f"NormSim supports p = 2 or p = inf (pass 2.0 or float('inf')), got {self.p!r}.")
        object.__setattr__(self, "p", float(self.p))


class NormSim(_EmbeddingScorer):
    """NormSim_p of each pool image against the target images (p = 2 or inf; image embeddings only).

    Args:
        p: ``2.0`` or ``float("inf")`` (the paper's headline filter uses ``inf``).

    The settings are held in :attr:`arguments` (a :class:`NormSimArguments`).
    """

    name: ClassVar[str] = "normsim"
    reads_pool_sample: ClassVar[bool] = False

    def __init__(self, *, p: float = float("inf")) -> None:
        self.arguments = NormSimArguments(p=p)
        self.target_image: Tensor | None = None

    def prepare_round(self, endpoint: EndPoint, target: PairFeatures | None, pool_sample: PairFeatures) -> None:
        super().prepare_round(endpoint, target, pool_sample)
        self.target_image = self._embed(target)[0]

    def score(self, batch: PairFeatures) -> Tensor:
        return normsim(self._embed(batch)[0], self.target_image, p=self.p)


@dataclass(frozen=True)
class NegCLIPLossArguments:
    """The settings of :class:`NegCLIPLoss` (validated once when built; see its Args).

    Raises:
        ValueError: ``temperature <= 0``, ``batch_size < 2``, ``repeats < 1`` or a seed that is not an integer.
    """

    temperature: float = 0.01
    batch_size: int = 32768
    repeats: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", real_setting("temperature", self.temperature, above=0))
        object.__setattr__(self, "batch_size", integer_setting("batch_size", self.batch_size, minimum=2))
        object.__setattr__(self, "repeats", integer_setting("repeats", self.repeats, minimum=1))
        object.__setattr__(self, "seed", integer_setting("seed", self.seed))


class NegCLIPLoss(_EmbeddingScorer):
    """negCLIPLoss: CLIPScore minus the symmetric batch normaliser, over ``repeats`` random pool batchings.

    The batchings partition the pool sample given to :meth:`prepare` (the whole pool under
    :class:`~lightning_chips.DataSelectionCallback` with ``pool_sample=None``), so the scores of those pairs are
    exact and :meth:`score` looks them up by id. A pair outside that sample is scored against ``repeats`` seeded
    random batches of ``batch_size - 1`` sample pairs (a stand-in for its batch in a partition).

    A model trained with SigLIP's sigmoid loss (an end point with a logit bias) is scored by the analogue,
    negSigLIPLoss (:func:`~lightning_chips.functional.quality.negsiglip_loss`): minus ``tau`` times the pair's
    per-sample sigmoid loss in the same batches, with the model's logit bias as a cosine threshold ``-beta_l / s``.

    Args:
        temperature: ``tau`` (paper: 0.01).
        batch_size: batch size of the partitions (paper: 32768).
        repeats: number of random partitions (paper: 10).
        seed: seed of the partitions.

    The settings are held in :attr:`arguments` (a :class:`NegCLIPLossArguments`).
    """

    name: ClassVar[str] = "negclip"
    requires_target = False

    def __init__(self, *, temperature: float = 0.01, batch_size: int = 32768, repeats: int = 10, seed: int = 0) -> None:
        self.arguments = NegCLIPLossArguments(
            temperature=temperature, batch_size=batch_size, repeats=repeats, seed=seed
        )
        self._lookup: IdLookup | None = None
        self._sample: tuple[Tensor, Tensor] | None = None

    def prepare_round(self, endpoint: EndPoint, target: PairFeatures | None, pool_sample: PairFeatures) -> None:
        super().prepare_round(endpoint, target, pool_sample)
        x, y = self._embed(pool_sample)
        if self.endpoint.loss == "sigmoid":
            scores = negsiglip_loss(
                x, y, threshold=self._threshold(), temperature=self.temperature, batch_size=self.batch_size,
                repeats=self.repeats, seed=self.seed + self.round,
            )  # fmt: skip
        else:
            scores = negclip_loss(x, y, temperature=self.temperature, batch_size=self.batch_size, repeats=self.repeats,
                                  seed=self.seed + self.round)  # fmt: skip
        self._lookup = IdLookup(pool_sample.ids, scores)
        self._sample = (x, y)

    def score(self, batch: PairFeatures) -> Tensor:
        x, y = self._embed(batch)
        out, known = self._lookup.find(batch.ids)
        out, known = out.to(x.device), known.to(x.device)
        if (~known).any():
            out[~known] = self._against_sample(x[~known], y[~known])
        return out

    def _threshold(self) -> float:
        """The sigmoid model's cosine threshold ``c_0 = -beta_l / s`` (negSigLIPLoss)."""
        return sigmoid_threshold(self.endpoint.logit_scale, self.endpoint.logit_bias)

    def _against_sample(self, x: Tensor, y: Tensor) -> Tensor:
        """Pairs outside the prepared sample: each repeat uses one seeded batch of ``batch_size - 1`` sample
        pairs (the same for every such pair, so a score does not depend on its scoring batch)."""
        sx, sy = self._sample
        m = min(self.batch_size - 1, sx.shape[0])
        tau = self.temperature
        pos = (x * y).sum(1, keepdim=True).double()
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for r in range(self.repeats):
            g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + self.round * 1009 + r)
            idx = torch.randperm(sx.shape[0], generator=g)[:m].to(x.device)
            if self.endpoint.loss == "sigmoid":  # negSigLIPLoss: -tau times the per-sample sigmoid loss
                c0 = self._threshold()
                rows, cols = ((x @ sy[idx].T).double() - c0) / tau, ((y @ sx[idx].T).double() - c0) / tau
                loss = F.softplus(-(pos[:, 0] - c0) / tau) + 0.5 * (F.softplus(rows).sum(1) + F.softplus(cols).sum(1))
                total -= tau * loss
            else:
                rows = torch.cat([pos, (x @ sy[idx].T).double()], dim=1)
                cols = torch.cat([pos, (y @ sx[idx].T).double()], dim=1)
                total += pos[:, 0] - 0.5 * tau * (torch.logsumexp(rows / tau, 1) + torch.logsumexp(cols / tau, 1))
        return (total / self.repeats).to(x.dtype)


@dataclass(frozen=True)
class ClipCovArguments:
    """The settings of :class:`ClipCov` (validated once when built; see its Args). ``classnames`` and
    ``templates`` are kept as tuples.

    Raises:
        ValueError: an unknown ``classes``, ``num_clusters < 1``, ``classes="zeroshot"`` without ``classnames`` or
            templates, a ``classnames`` string instead of a list, or a seed that is not an integer.
    """

    classes: str = "kmeans"
    num_clusters: int = 10
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = _TEMPLATES
    seed: int = 0

    def __post_init__(self) -> None:
        choice_setting("classes", self.classes, _CLASSES)
        object.__setattr__(self, "num_clusters", integer_setting("num_clusters", self.num_clusters, minimum=1))
        object.__setattr__(self, "classnames", strings_setting("classnames", self.classnames))
        object.__setattr__(self, "templates", strings_setting("templates", self.templates))
        object.__setattr__(self, "seed", integer_setting("seed", self.seed))
        if self.classes == "zeroshot" and not (self.classnames and self.templates):
            raise ValueError(
                "ClipCov(classes='zeroshot') needs `classnames` (and at least one template) to pseudo-label the pool."
            )


class _SetLevelScorer(_EmbeddingScorer):
    """A set-level score: :meth:`prepare_round` stores every pool-sample pair's score in ``_lookup`` by id, and
    only those pairs can be scored."""

    _lookup: IdLookup | None = None

    def score(self, batch: PairFeatures) -> Tensor:
        if self._lookup is None:
            raise RuntimeError(f"{type(self).__name__}.score called before prepare().")
        return self._lookup.require(batch.ids, type(self).__name__).to(batch.image.device)


class ClipCov(_SetLevelScorer):
    """ClipCov (Joshi et al., AISTATS 2024): per latent class, the greedy order that preserves the image-caption
    cross-covariance (see :mod:`lightning_chips.functional.clipcov`), as a score.

    A set-level method: :meth:`prepare` runs the greedy over the pool sample (the whole pool under the callback's
    default ``pool_sample=None``) and a pair scores ``1 - (rank + 0.5) / n_class``, so the global top-k keeps the
    first picks of every class in proportion to its size. Classes are the pool's ``labels`` (``classes="labels"``),
    zero-shot pseudo-labels over ``classnames`` (``classes="zeroshot"``, through the caller's ``text_encoder``), or
    seeded cosine k-means clusters of the image embeddings **[ours]**.

    Args:
        classes: ``"kmeans"``, ``"labels"`` or ``"zeroshot"``.
        num_clusters: k of k-means.
        classnames: class list for zero-shot pseudo-labels.
        templates: prompt templates for zero-shot pseudo-labels.
        seed: k-means seed.

    The settings are held in :attr:`arguments` (a :class:`ClipCovArguments`).
    """

    name: ClassVar[str] = "clipcov"
    requires_target = False

    def __init__(
        self,
        *,
        classes: str = "kmeans",
        num_clusters: int = 10,
        classnames: list[str] | None = None,
        templates: list[str] = ("a photo of a {}.",),  # noqa: B006 - a tuple, immutable
        seed: int = 0,
    ) -> None:
        self.arguments = ClipCovArguments(classes=classes, num_clusters=num_clusters, classnames=classnames,
                                          templates=templates, seed=seed)  # fmt: skip
        self._lookup: IdLookup | None = None

    def prepare_round(self, endpoint: EndPoint, target: PairFeatures | None, pool_sample: PairFeatures) -> None:
        from lightning_chips.functional.clipcov import clipcov_order, kmeans

        super().prepare_round(endpoint, target, pool_sample)
        x, y = self._embed(pool_sample)
        if self.classes == "kmeans":
            labels = kmeans(x.cpu(), min(self.num_clusters, len(x)), seed=self.seed)
        else:
            prompts = _class_embeddings(self, self.classnames, self.templates) if self.classes == "zeroshot" else None
            labels = _given_or_zeroshot_labels(self, "classes", x, prompts, pool_sample)
        order = clipcov_order(x.cpu(), y.cpu(), labels)
        sizes = torch.bincount(labels)[labels].double()
        scores = 1.0 - (order.double() + 0.5) / sizes
        self._lookup = IdLookup(pool_sample.ids, scores)


def _given_or_zeroshot_labels(
    scorer: Scorer, keyword: str, x: Tensor, prompts: Tensor | None, pool_sample: PairFeatures
) -> Tensor:
    """The class of each pool-sample pair, ClipCov's ``classes`` and ClipPowered's ``labels`` alike (the value of the
    ``keyword`` setting): ``"zeroshot"``, the argmax of the image embeddings ``x`` over the class ``prompts``;
    ``"labels"``, the pool's own labels (a ``ValueError`` naming ``keyword`` when the pool has none)."""
    if getattr(scorer, keyword) == "zeroshot":
        return (x.double().cpu() @ prompts.cpu().T).argmax(1)
    if pool_sample.labels is None:
        raise ValueError(
            f"{type(scorer).__name__}({keyword}='labels') needs a 'label' per pool pair; use {keyword}='kmeans'."
        )
    return pool_sample.labels.cpu()


def _class_embeddings(scorer: Scorer, classnames: list[str], templates: list[str]) -> Tensor:
    """``[C, e]`` template-averaged, renormalised prompt embeddings through the caller's ``text_encoder``."""
    if scorer.text_encoder is None:
        raise ValueError(
            f"{type(scorer).__name__} needs class-prompt embeddings: pass `RoundContext(text_encoder=...)` to prepare "
            "(DataSelectionCallback and lightning-chips score do), a function mapping prompts to normalised text "
            "embeddings."
        )
    prompts = [p for name in classnames for p in format_prompts(name, templates)]
    emb = F.normalize(scorer.text_encoder(prompts).double(), dim=-1).reshape(len(classnames), len(templates), -1)
    bad = ~torch.isfinite(emb).all(-1).all(-1)
    if bool(bad.any()):
        names = [name for name, b in zip(classnames, bad.tolist(), strict=True) if b]
        raise FloatingPointError(
            f"{type(scorer).__name__}: the class-prompt embeddings of {names[:5]} hold NaN or inf (round "
            f"{scorer.round}): the model's text tower has diverged."
        )
    return F.normalize(emb.mean(1), dim=-1)


@dataclass(frozen=True)
class ClipPoweredArguments:
    """The settings of :class:`ClipPowered` (validated once when built; see its Args). ``labels=None`` resolves to
    ``"labels"`` with class names and ``"kmeans"`` without; ``classnames`` and ``templates`` are kept as tuples.

    Raises:
        ValueError: an unknown ``labels``, ``labels="labels"`` or ``"zeroshot"`` without class names or templates,
            ``num_clusters < 1``, ``neighbours < 1``, ``adapter_epochs < 0``, a negative or non-finite
            ``diversity_weight``, a non-bool ``train_adapters`` or a seed that is not an integer.
    """

    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = _TEMPLATES
    labels: str | None = None
    num_clusters: int = 20
    train_adapters: bool = True
    adapter_epochs: int = 5
    neighbours: int = 50
    diversity_weight: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "classnames", strings_setting("classnames", self.classnames))
        object.__setattr__(self, "templates", strings_setting("templates", self.templates))
        labels = self.labels if self.labels is not None else ("labels" if self.classnames else "kmeans")
        object.__setattr__(self, "labels", choice_setting("labels", labels, _CLASSES))
        if labels != "kmeans" and (not self.classnames or not self.templates):
            raise ValueError(f"ClipPowered(labels={labels!r}) needs `classnames` and at least one prompt template; "
                             "without class names use labels='kmeans'.")  # fmt: skip
        object.__setattr__(self, "num_clusters", integer_setting("num_clusters", self.num_clusters, minimum=1))
        if not isinstance(self.train_adapters, bool):
            raise ValueError(f"`train_adapters` must be True or False, got {self.train_adapters!r}.")
        object.__setattr__(self, "adapter_epochs", integer_setting("adapter_epochs", self.adapter_epochs, minimum=0))
        object.__setattr__(self, "neighbours", integer_setting("neighbours", self.neighbours, minimum=1))
        weight = real_setting("diversity_weight", self.diversity_weight, at_least=0)
        object.__setattr__(self, "diversity_weight", weight)
        object.__setattr__(self, "seed", integer_setting("seed", self.seed))


class ClipPowered(_SetLevelScorer):
    """CLIP-powered selection (Yang et al., ICLR 2025): semantic alignment + diversity, as a set-level score.

    :meth:`prepare` embeds the class prompts (``templates`` over ``classnames``) with the caller's
    ``text_encoder``, labels the pool sample (its ``labels``, or zero-shot pseudo-labels), trains the two adapters
    and scores every pair with ``c = SAS/mean + 0.1 SDS/mean``. Without class names (the default,
    ``labels="kmeans"`` **[ours]**) the classes are ``num_clusters`` k-means clusters of the pool sample's caption
    embeddings (the caption is the annotation, as the paper's labels are) and each class's "prompt" embedding is
    its cluster's normalised mean caption, so the semantic-alignment score asks how well a pair's image fits what
    its caption's cluster says: a pair whose caption belongs to other images scores low
    (:func:`~lightning_chips.functional.clip_powered.clip_powered_scores`); the callback's top-k of ``c`` is the
    closed-form selection with an exact budget. Pairs it was not prepared on cannot be scored.

    Args:
        classnames: the class names (``labels`` index them); needed by ``labels="labels"`` and ``"zeroshot"``.
        templates: prompt templates (``"a photo of a {}."``).
        labels: ``"kmeans"`` (default: clusters, no class names needed), ``"labels"`` (the pool's) or
            ``"zeroshot"`` (argmax over the class prompts).
        num_clusters: clusters of ``labels="kmeans"``.
        train_adapters: train the adapters (identity adapters otherwise).
        adapter_epochs: adapter training epochs.
        neighbours: ``K`` of the diversity score.
        diversity_weight: SDS weight (paper: 0.1).
        seed: adapter-training seed.

    The settings are held in :attr:`arguments` (a :class:`ClipPoweredArguments`).
    """

    name: ClassVar[str] = "clip_powered"
    requires_target = False

    def __init__(
        self,
        classnames: list[str] | None = None,
        templates: list[str] = ("a photo of a {}.",),  # noqa: B006 - a tuple, immutable
        *,
        labels: str | None = None,
        num_clusters: int = 20,
        train_adapters: bool = True,
        adapter_epochs: int = 5,
        neighbours: int = 50,
        diversity_weight: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.arguments = ClipPoweredArguments(
            classnames=classnames, templates=templates, labels=labels, num_clusters=num_clusters,
            train_adapters=train_adapters, adapter_epochs=adapter_epochs, neighbours=neighbours,
            diversity_weight=diversity_weight, seed=seed,
        )  # fmt: skip
        self._lookup: IdLookup | None = None

    def prepare_round(self, endpoint: EndPoint, target: PairFeatures | None, pool_sample: PairFeatures) -> None:
        from lightning_chips.functional.clip_powered import clip_powered_scores

        super().prepare_round(endpoint, target, pool_sample)
        x, y = (e.double().cpu() for e in self._embed(pool_sample))
        if self.labels == "kmeans":
            from lightning_chips.functional.clipcov import kmeans

            labels = kmeans(y, min(self.num_clusters, len(y)), seed=self.seed)  # the captions say the class
            sums = torch.zeros(int(labels.max()) + 1, y.shape[1], dtype=y.dtype).index_add_(0, labels, y)
            prompts = F.normalize(sums, dim=-1)  # each cluster's mean caption, as its "class prompt"
        else:
            prompts = _class_embeddings(self, self.classnames, self.templates).cpu()
            labels = _given_or_zeroshot_labels(self, "labels", x, prompts, pool_sample)
        scores = clip_powered_scores(
            x, prompts, labels, train_adapters=self.train_adapters, adapter_epochs=self.adapter_epochs,
            neighbours=self.neighbours, diversity_weight=self.diversity_weight, seed=self.seed,
        )  # fmt: skip
        self._lookup = IdLookup(pool_sample.ids, scores.combined)
