"""The functional zero-shot metrics (lightning_chips.functional.zero_shot) give the numbers of the metric classes
(lightning_chips.metrics) on random inputs: one batch, several batches, and de-duplicated ids."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_chips.functional import retrieval_recall_at_k, zero_shot_accuracy
from lightning_chips.metrics import RetrievalRecallAtK, ZeroShotAccuracy


def _assert_same(functional: dict[str, torch.Tensor], metric: dict[str, torch.Tensor]) -> None:
    assert list(functional) == list(metric)
    for name, value in metric.items():
        if math.isnan(float(value)):
            assert math.isnan(float(functional[name])), name
        else:
            assert torch.equal(functional[name], value), (name, functional[name], value)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_classes, top_k", [(7, (1, 5)), (3, (1, 2, 5)), (12, (3,))])
def test_zero_shot_accuracy_equals_the_metric(seed, num_classes, top_k):
    g = torch.Generator().manual_seed(seed)
    classifier = torch.randn(16, num_classes, generator=g) * 3.0  # unnormalised columns
    images = torch.randn(200, 16, generator=g) * 2.0
    target = torch.randint(0, num_classes, (200,), generator=g)
    expected = ZeroShotAccuracy(classifier, top_k=top_k)
    for start in range(0, 200, 64):  # batches: the metric's sums equal one functional call over all samples
        expected.update(images[start : start + 64], target[start : start + 64])
    _assert_same(zero_shot_accuracy(images, target, classifier, top_k=top_k), expected.compute())


def test_zero_shot_accuracy_equals_the_metric_with_repeated_ids():
    g = torch.Generator().manual_seed(3)
    classifier, images = torch.randn(8, 5, generator=g), torch.randn(60, 8, generator=g)
    target = torch.randint(0, 5, (60,), generator=g)
    metric = ZeroShotAccuracy(classifier)
    metric.update(images, target, ids=torch.arange(60))
    metric.update(images[:10], target[:10], ids=torch.arange(10))  # DDP padding: repeats dropped after the sync
    _assert_same(zero_shot_accuracy(images, target, classifier), metric.compute())


def test_zero_shot_accuracy_refuses_what_the_metric_refuses():
    with pytest.raises(ValueError, match="class indices"):
        zero_shot_accuracy(torch.randn(2, 4), torch.tensor([0, 3]), torch.randn(4, 3))
    with pytest.raises(ValueError, match="top_k"):
        zero_shot_accuracy(torch.randn(2, 4), torch.tensor([0, 1]), torch.randn(4, 3), top_k=())
    with pytest.raises(ValueError, match="classifier"):
        zero_shot_accuracy(torch.randn(2, 4), torch.tensor([0, 1]), torch.randn(4))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("captions_per_image, k, chunk_size", [(1, (1, 5, 10), 1024), (3, (1, 2, 50), 7)])
def test_retrieval_recall_equals_the_metric(seed, captions_per_image, k, chunk_size):
    g = torch.Generator().manual_seed(seed)
    n = 40
    images = torch.randn(n, 12, generator=g) * 2.0
    image_ids = torch.randperm(n, generator=g) + 100
    text_image_ids = image_ids.repeat_interleave(captions_per_image)
    texts = images.repeat_interleave(captions_per_image, 0) + 1.5 * torch.randn(len(text_image_ids), 12, generator=g)
    metric = RetrievalRecallAtK(k=k, chunk_size=chunk_size)
    half, half_t = n // 2, (n // 2) * captions_per_image
    metric.update(images[:half], image_ids[:half], texts[:half_t], text_image_ids[:half_t])
    metric.update(images[half:], image_ids[half:], texts[half_t:], text_image_ids[half_t:])
    functional = retrieval_recall_at_k(images, image_ids, texts, text_image_ids, k=k, chunk_size=chunk_size)
    _assert_same(functional, metric.compute())


def test_retrieval_recall_refuses_what_the_metric_refuses():
    with pytest.raises(ValueError, match="one id"):
        retrieval_recall_at_k(torch.randn(3, 4), torch.arange(2), torch.randn(3, 4), torch.arange(3))
    with pytest.raises(ValueError, match="`k`"):
        retrieval_recall_at_k(torch.randn(3, 4), torch.arange(3), torch.randn(3, 4), torch.arange(3), k=(0,))
    with pytest.raises(ValueError, match="at least one image"):
        retrieval_recall_at_k(torch.randn(0, 4), torch.arange(0), torch.randn(3, 4), torch.arange(3))
