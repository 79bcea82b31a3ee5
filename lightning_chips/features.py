"""One pass of a CLIP over image-text pairs -> :class:`PairFeatures` (pre-projection features with ids)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_chips.adapters import CLIPAdapter
from lightning_chips.ids import id_keys

__all__ = ["PairFeatures", "extract_features", "iter_features"]


@dataclass
class PairFeatures:
    """Pre-projection features of image-text pairs with their stable int64 ids (the keys of string ids).

    Attributes:
        ids: ``[N]`` int64 sample ids (stable per sample: dataset index or a uid).
        image: ``[N, d_v]`` image features ``h_v``.
        text: ``[N, d_t]`` text features ``h_t``.
        labels: optional ``[N]`` int64 class labels (for stratified selection and set-level baselines).
    """

    ids: Tensor
    image: Tensor
    text: Tensor
    labels: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.ids.shape[0]
        if self.ids.dim() != 1:
            raise ValueError(f"PairFeatures.ids must be 1-d, got shape {tuple(self.ids.shape)}.")
        for name in ("image", "text"):
            value = getattr(self, name)
            if value.dim() != 2 or value.shape[0] != n:
                raise ValueError(f"PairFeatures.{name} must be [N={n}, d], got shape {tuple(value.shape)}.")
        if self.labels is not None and tuple(self.labels.shape) != (n,):
            raise ValueError(f"PairFeatures.labels must be [N={n}], got shape {tuple(self.labels.shape)}.")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def index(self, idx: Tensor | slice) -> PairFeatures:
        """Rows ``idx``."""
        return PairFeatures(
            self.ids[idx], self.image[idx], self.text[idx], None if self.labels is None else self.labels[idx]
        )

    def to(self, *args: Any, **kwargs: Any) -> PairFeatures:
        """``Tensor.to`` on the feature tensors (ids and labels keep their dtype)."""
        device = kwargs.get("device", next((a for a in args if isinstance(a, str | torch.device)), None))
        return PairFeatures(
            self.ids if device is None else self.ids.to(device),
            self.image.to(*args, **kwargs),
            self.text.to(*args, **kwargs),
            None if self.labels is None or device is None else self.labels.to(device),
        )

    def sorted_by_id(self) -> PairFeatures:
        """The rows in increasing id order: the canonical order of a target or pool sample given to
        ``Scorer.prepare``, so a scorer's state (its seeded bank and curvature sample) depends on which pairs it
        got, not on the order they were read in (dataset order, shard order, ranks)."""
        order = torch.argsort(self.ids, stable=True)
        return self.index(order.to(self.ids.device))

    def batches(self, batch_size: int) -> Iterable[PairFeatures]:
        """Consecutive chunks of at most ``batch_size`` rows."""
        for start in range(0, len(self), batch_size):
            yield self.index(slice(start, start + batch_size))

    @staticmethod
    def cat(parts: list[PairFeatures]) -> PairFeatures:
        """Concatenate along the sample axis."""
        labels = None if any(p.labels is None for p in parts) else torch.cat([p.labels for p in parts])
        return PairFeatures(
            torch.cat([p.ids for p in parts]),
            torch.cat([p.image for p in parts]),
            torch.cat([p.text for p in parts]),
            labels,
        )


def iter_features(
    adapter: CLIPAdapter,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
    description: str = "features",
    total: int | None = None,
) -> Iterator[PairFeatures]:
    """Yield the :class:`PairFeatures` of each batch of ``{"image", "text", "id"[, "label"]}`` dicts.

    Runs the adapter's towers in eval mode under ``torch.no_grad`` (the module's mode is restored afterwards);
    features stay on the model's device. Tokens go through :meth:`CLIPAdapter.trim_tokens` first (open_clip's
    causal text towers skip the padding after the batch's longest caption: same features, less compute). A
    streaming consumer (a scorer) keeps memory bounded by one batch. The progress bar shows ``total`` batches (default:
    ``len(batches)`` when it has one) with an ETA.
    """
    module = adapter.module
    was_training = module.training
    if device is None:
        device = next(module.parameters()).device
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        if total is None:
            try:
                total = len(batches)  # type: ignore[arg-type]
            except TypeError:  # a stream of unknown length
                total = None
        iterator = tqdm(batches, desc=description, leave=False, dynamic_ncols=True, total=total, unit="batch")
    module.eval()
    try:
        for batch in iterator:
            with torch.no_grad():
                images = batch["image"].to(device, non_blocking=True)
                tokens = adapter.trim_tokens(batch["text"].to(device, non_blocking=True))
                image = adapter.image_features(images).float()
                text = adapter.text_features(tokens).float()
            labels = batch.get("label")
            ids = batch["id"]
            if isinstance(ids, list | tuple):  # string ids: their int64 keys (lightning_chips.ids)
                ids = id_keys(ids)
            yield PairFeatures(
                torch.as_tensor(ids, dtype=torch.int64, device=image.device),
                image,
                text,
                None if labels is None else torch.as_tensor(labels, dtype=torch.int64, device=image.device),
            )
    finally:
        module.train(was_training)


def extract_features(
    adapter: CLIPAdapter,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
    description: str = "features",
) -> PairFeatures:
    """All the :class:`PairFeatures` of ``batches`` concatenated, on the CPU (see :func:`iter_features`)."""
    parts = [f.to("cpu") for f in iter_features(adapter, batches, device=device, progress=progress,
                                                 description=description)]  # fmt: skip
    if not parts:
        raise ValueError(f"No batches to extract {description} from: the dataloader is empty.")
    return PairFeatures.cat(parts)
