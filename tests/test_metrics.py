"""Zero-shot metrics against independent computations: torchmetrics' functional accuracy/recall, brute-force
retrieval loops over the full similarity matrix, a hand-built prompt ensemble, and 2-process DDP with padding."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_recall
from torchmetrics.retrieval import RetrievalRecall

from lightning_chips.metrics import (
    RetrievalRecallAtK,
    ZeroShotAccuracy,
    build_zero_shot_classifier,
    format_prompts,
)

from .conftest import TINY_VIT

DDP_SCRIPT = Path(__file__).parent / "scripts" / "ddp_metrics.py"


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
def _classification_data(seed: int, num_classes: int, n: int = 300, dim: int = 16):
    """Unnormalised classifier ``[dim, C]``, image embeddings of arbitrary norms near their class column, and
    unbalanced targets (class c drawn with weight growing in c; every class present)."""
    g = torch.Generator().manual_seed(seed)
    classifier = torch.randn(dim, num_classes, generator=g) * (0.5 + torch.rand(num_classes, generator=g))
    weights = torch.linspace(1.0, 6.0, num_classes)
    target = torch.multinomial(weights, n, replacement=True, generator=g)
    target[:num_classes] = torch.arange(num_classes)
    x = 0.5 * F.normalize(classifier, dim=0)[:, target].T + 0.3 * torch.randn(n, dim, generator=g)
    x = x * (0.5 + torch.rand(n, 1, generator=g))
    return classifier, x, target


def _retrieval_data(seed: int, num_images: int = 40, per_image: int = 5, dim: int = 16, noise: float = 2.0):
    """``num_images`` images with non-contiguous ids and ``per_image`` noisy captions each, captions shuffled."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, dim, generator=g)
    image_ids = torch.randperm(num_images, generator=g) * 3 + 100
    texts = images.repeat_interleave(per_image, 0) + noise * torch.randn(num_images * per_image, dim, generator=g)
    text_image_ids = image_ids.repeat_interleave(per_image)
    text_ids = torch.arange(num_images * per_image) * 7 + 11
    perm = torch.randperm(num_images * per_image, generator=g)
    return images, image_ids, texts[perm], text_image_ids[perm], text_ids[perm]


def _logits(x: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1) @ F.normalize(classifier, dim=0)


def _values(result: dict) -> dict:
    return {k: float(v) for k, v in result.items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        va, vb = float(a[key]), float(b[key])
        assert (math.isnan(va) and math.isnan(vb)) or va == pytest.approx(vb, abs=1e-6), (key, va, vb)


# ---------------------------------------------------------------------------------------------------------------
# ZeroShotAccuracy
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [3, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_matches_torchmetrics_and_an_argmax_loop(seed, num_classes):
    classifier, x, target = _classification_data(seed, num_classes)
    metric = ZeroShotAccuracy(classifier, top_k=(1, 5))
    metric.update(x, target)
    result = metric.compute()
    assert set(result) == {"acc1", "acc5", "mean_per_class_recall"}

    logits = _logits(x, classifier)
    acc1 = multiclass_accuracy(logits, target, num_classes=num_classes, average="micro", top_k=1)
    assert float(result["acc1"]) == pytest.approx(float(acc1), abs=1e-6)
    if num_classes >= 5:
        acc5 = multiclass_accuracy(logits, target, num_classes=num_classes, average="micro", top_k=5)
        assert float(result["acc5"]) == pytest.approx(float(acc5), abs=1e-6)
        assert float(result["acc1"]) < float(result["acc5"]) < 1.0
    else:
        assert math.isnan(float(result["acc5"]))  # fewer classes than k: undefined, as clip_benchmark reports
    assert 0.0 < float(result["acc1"]) < 1.0

    macro = multiclass_recall(logits, target, num_classes=num_classes, average="macro", top_k=1)
    assert float(result["mean_per_class_recall"]) == pytest.approx(float(macro), abs=1e-6)
    # direct loop: per class, the share of its samples whose argmax is the class, averaged over classes
    predicted = logits.argmax(1).tolist()
    per_class = []
    for c in range(num_classes):
        members = [i for i, t in enumerate(target.tolist()) if t == c]
        per_class.append(sum(predicted[i] == c for i in members) / len(members))
    loop = sum(per_class) / num_classes
    assert float(result["mean_per_class_recall"]) == pytest.approx(loop, abs=1e-6)
    # unbalanced classes: the class-averaged recall is not the sample-averaged accuracy
    assert abs(loop - float(acc1)) > 1e-5


def test_accuracy_with_more_k_values_and_k_equal_to_num_classes():
    classifier, x, target = _classification_data(3, num_classes=4)
    metric = ZeroShotAccuracy(classifier, top_k=(2, 4, 5))
    metric.update(x, target)
    result = metric.compute()
    logits = _logits(x, classifier)
    for k in (2, 4):
        expected = multiclass_accuracy(logits, target, num_classes=4, average="micro", top_k=k)
        assert float(result[f"acc{k}"]) == pytest.approx(float(expected), abs=1e-6)
    assert float(result["acc4"]) == 1.0
    assert math.isnan(float(result["acc5"]))


@pytest.mark.parametrize("with_ids", [False, True])
def test_accuracy_is_the_same_in_one_update_or_many_batches(with_ids):
    classifier, x, target = _classification_data(4, num_classes=10)
    ids = torch.arange(len(target)) * 5 + 3
    whole = ZeroShotAccuracy(classifier)
    whole.update(x, target, ids if with_ids else None)
    batched = ZeroShotAccuracy(classifier)
    sizes = [1, 7, 64, 13, 100, 115]
    assert sum(sizes) == len(target)
    for xb, tb, ib in zip(x.split(sizes), target.split(sizes), ids.split(sizes), strict=True):
        batched.update(xb, tb, ib if with_ids else None)
    _assert_same(whole.compute(), batched.compute())
    # and with / without ids agree when nothing is duplicated
    plain = ZeroShotAccuracy(classifier)
    plain.update(x, target)
    _assert_same(whole.compute(), plain.compute())


def test_accuracy_with_ids_ignores_duplicated_samples():
    classifier, x, target = _classification_data(5, num_classes=10)
    ids = torch.arange(len(target)) + 1000
    reference = ZeroShotAccuracy(classifier)
    reference.update(x, target, ids)
    expected = _values(reference.compute())

    # duplicate the misclassified samples (a duplicate that changes the numbers if counted twice)
    missed = (_logits(x, classifier).argmax(1) != target).nonzero().flatten()[:20]
    assert len(missed) > 0
    dup = torch.cat([missed, missed[:3]])  # also duplicated within one batch

    with_ids = ZeroShotAccuracy(classifier)
    with_ids.update(x[:150], target[:150], ids[:150])
    with_ids.update(x[dup], target[dup], ids[dup])
    with_ids.update(x[150:], target[150:], ids[150:])
    with_ids.update(x[dup], target[dup], ids[dup])
    _assert_same(with_ids.compute(), expected)

    # sanity: without ids the same duplicates do change the result, so the test above is sensitive
    without_ids = ZeroShotAccuracy(classifier)
    without_ids.update(x, target)
    without_ids.update(x[dup], target[dup])
    assert float(without_ids.compute()["acc1"]) < expected["acc1"] - 1e-3


def test_accuracy_forward_returns_the_batch_value_and_accumulates():
    classifier, x, target = _classification_data(6, num_classes=10)
    ids = torch.arange(len(target))
    metric = ZeroShotAccuracy(classifier)
    for i in (slice(0, 100), slice(100, 300), slice(0, 30)):  # the last batch repeats ids 0..29
        batch_value = metric(x[i], target[i], ids[i])
        alone = ZeroShotAccuracy(classifier)
        alone.update(x[i], target[i])
        _assert_same(batch_value, alone.compute())
    reference = ZeroShotAccuracy(classifier)
    reference.update(x, target)
    _assert_same(metric.compute(), reference.compute())


@pytest.mark.parametrize("convert", ["double", "bfloat16"])
def test_accuracy_survives_the_parent_module_dtype_conversion_of_true_precision(convert):
    classifier, x, target = _classification_data(7, num_classes=10)
    reference = ZeroShotAccuracy(classifier)
    reference.update(x, target)
    parent = torch.nn.Module()
    parent.metric = ZeroShotAccuracy(classifier)
    parent = parent.double() if convert == "double" else parent.to(dtype=torch.bfloat16)
    parent.metric.update(x, target)
    _assert_same(parent.metric.compute(), reference.compute())


def test_accuracy_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ZeroShotAccuracy(torch.randn(8))
    with pytest.raises(ValueError):
        ZeroShotAccuracy(torch.randn(8, 3), top_k=())
    with pytest.raises(ValueError):
        ZeroShotAccuracy(torch.randn(8, 3), top_k=(0,))
    metric = ZeroShotAccuracy(torch.randn(8, 3))
    with pytest.raises(ValueError):
        metric.update(torch.randn(2, 8), torch.tensor([0, 3]))


# ---------------------------------------------------------------------------------------------------------------
# RetrievalRecallAtK
# ---------------------------------------------------------------------------------------------------------------
def _brute_force_recall(images, image_ids, texts, text_image_ids, ks) -> dict:
    """Hit rates by Python loops over every query's full ranking (float64, independent of the metric's code)."""
    similarity = F.normalize(texts.double(), dim=-1) @ F.normalize(images.double(), dim=-1).T  # [T, N]
    img_ids, txt_img_ids = image_ids.tolist(), text_image_ids.tolist()
    num_texts, num_images = similarity.shape
    out = {}
    for k in ks:
        hits = 0
        for q in range(num_texts):
            row = similarity[q].tolist()
            ranked = sorted(range(num_images), key=lambda j: row[j], reverse=True)
            hits += any(img_ids[j] == txt_img_ids[q] for j in ranked[:k])
        out[f"image_retrieval_recall@{k}"] = hits / num_texts
        hits = 0
        for q in range(num_images):
            column = similarity[:, q].tolist()
            ranked = sorted(range(num_texts), key=lambda j: column[j], reverse=True)
            hits += any(txt_img_ids[j] == img_ids[q] for j in ranked[:k])
        out[f"text_retrieval_recall@{k}"] = hits / num_images
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_brute_force_hit_rate_for_every_chunk_size(seed):
    images, image_ids, texts, text_image_ids, text_ids = _retrieval_data(seed)
    ks = (1, 5, 10)
    expected = _brute_force_recall(images, image_ids, texts, text_image_ids, ks)
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@1", "image_retrieval_recall@5"):
        assert 0.0 < expected[key] < 1.0, (key, expected[key])  # the data is neither trivial nor hopeless

    results = []
    for chunk_size in (1, 7, 1024):
        metric = RetrievalRecallAtK(k=ks, chunk_size=chunk_size)
        for i, t in ((slice(0, 13), slice(0, 90)), (slice(13, 40), slice(90, 200))):
            metric.update(images[i], image_ids[i], texts[t], text_image_ids[t], text_ids[t])
        result = metric.compute()
        assert set(result) == set(expected)
        _assert_same(result, expected)
        results.append(result)
    for other in results[1:]:
        assert all(torch.equal(results[0][key], other[key]) for key in results[0])


@pytest.mark.parametrize("seed", [0, 1])
def test_text_retrieval_is_a_hit_rate_not_torchmetrics_retrieval_recall(seed):
    """With 5 captions per image, torchmetrics' RetrievalRecall (share of relevant captions in the top k) is not
    the CLIP-benchmark hit rate (any caption in the top k); ours is the hit rate."""
    images, image_ids, texts, text_image_ids, _ = _retrieval_data(seed)
    ks = (1, 5, 10)
    metric = RetrievalRecallAtK(k=ks)
    metric.update(images, image_ids, texts, text_image_ids)
    ours = _values(metric.compute())
    expected = _brute_force_recall(images, image_ids, texts, text_image_ids, ks)

    similarity = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T  # [N, T]: image queries
    relevant = image_ids[:, None] == text_image_ids[None, :]
    queries = torch.arange(len(images))[:, None].expand_as(similarity)
    for k in ks:
        share = float(RetrievalRecall(top_k=k)(similarity.flatten(), relevant.flatten(), indexes=queries.flatten()))
        hit_rate = ours[f"text_retrieval_recall@{k}"]
        assert hit_rate == pytest.approx(expected[f"text_retrieval_recall@{k}"], abs=1e-6)
        assert share <= hit_rate + 1e-6
        assert abs(share - hit_rate) > 1e-3, (k, share, hit_rate)
        if k == 1:  # one caption retrieved out of 5 relevant: the share is exactly a fifth of the hit rate
            assert share == pytest.approx(hit_rate / 5, abs=1e-6)
        # text queries have exactly one relevant image, so there the two definitions agree
        text_share = float(
            RetrievalRecall(top_k=k)(
                similarity.T.flatten(),
                relevant.T.flatten(),
                indexes=torch.arange(len(texts))[:, None].expand_as(similarity.T).flatten(),
            )
        )
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(text_share, abs=1e-6)


def test_retrieval_k_larger_than_the_gallery_is_clamped():
    images, image_ids, texts, text_image_ids, text_ids = _retrieval_data(6, num_images=4, per_image=2)
    metric = RetrievalRecallAtK(k=(1, 10))
    metric.update(images, image_ids, texts, text_image_ids, text_ids)
    result = _values(metric.compute())
    assert result["image_retrieval_recall@10"] == 1.0 and result["text_retrieval_recall@10"] == 1.0
    _assert_same(result, _brute_force_recall(images, image_ids, texts, text_image_ids, (1, 10)))


def test_retrieval_deduplicates_images_and_captions_by_id():
    images, image_ids, texts, text_image_ids, text_ids = _retrieval_data(7)
    reference = RetrievalRecallAtK()
    reference.update(images, image_ids, texts, text_image_ids, text_ids)
    expected = _values(reference.compute())

    # padding-style duplicates: image 3 again with all its captions, plus a few stray captions, twice
    own = (text_image_ids == image_ids[3]).nonzero().flatten()
    stray = torch.tensor([0, 5, 9, 9])
    metric = RetrievalRecallAtK()
    metric.update(images[:20], image_ids[:20], texts[:100], text_image_ids[:100], text_ids[:100])
    metric.update(images[3:4], image_ids[3:4], texts[own], text_image_ids[own], text_ids[own])
    metric.update(images[20:], image_ids[20:], texts[100:], text_image_ids[100:], text_ids[100:])
    for _ in range(2):
        metric.update(images[[3, 3]], image_ids[[3, 3]], texts[stray], text_image_ids[stray], text_ids[stray])
    _assert_same(metric.compute(), expected)


def test_retrieval_deduplicates_identical_caption_rows_without_text_ids():
    images, image_ids, texts, text_image_ids, _ = _retrieval_data(8)
    reference = RetrievalRecallAtK()
    reference.update(images, image_ids, texts, text_image_ids)
    expected = _values(reference.compute())
    # with text ids the numbers are the same (ids only matter for duplicates)
    with_ids = RetrievalRecallAtK()
    with_ids.update(images, image_ids, texts, text_image_ids, torch.arange(len(texts)))
    _assert_same(with_ids.compute(), expected)

    dup = torch.tensor([1, 2, 3, 50, 50, 199])
    metric = RetrievalRecallAtK()
    metric.update(images, image_ids, texts, text_image_ids)
    metric.update(images[[0, 7]], image_ids[[0, 7]], texts[dup], text_image_ids[dup])
    metric.update(images[[7]], image_ids[[7]], texts[dup[:2]], text_image_ids[dup[:2]])
    _assert_same(metric.compute(), expected)


def test_retrieval_counts_distinct_captions_with_distinct_text_ids():
    """Sanity for the de-duplication tests: a repeated caption under a *new* text id is a new query."""
    images, image_ids, texts, text_image_ids, text_ids = _retrieval_data(9)
    reference = RetrievalRecallAtK(k=(1,))
    reference.update(images, image_ids, texts, text_image_ids, text_ids)
    expected = float(reference.compute()["image_retrieval_recall@1"])
    per_text = _brute_force_recall(images, image_ids, texts, text_image_ids, (1,))
    assert per_text["image_retrieval_recall@1"] == pytest.approx(expected, abs=1e-6)

    similarity = F.normalize(texts, dim=-1) @ F.normalize(images, dim=-1).T
    missed = (image_ids[similarity.argmax(1)] != text_image_ids).nonzero().flatten()[:10]
    assert len(missed) == 10
    metric = RetrievalRecallAtK(k=(1,))
    metric.update(images, image_ids, texts, text_image_ids, text_ids)
    metric.update(images[:0], image_ids[:0], texts[missed], text_image_ids[missed], text_ids.max() + 1 + missed)
    assert float(metric.compute()["image_retrieval_recall@1"]) < expected - 1e-3


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric RetrievalRecallAtK was called before")
def test_retrieval_rejects_bad_arguments():
    with pytest.raises(ValueError):
        RetrievalRecallAtK(k=())
    with pytest.raises(ValueError):
        RetrievalRecallAtK(k=(0, 5))
    with pytest.raises(ValueError):
        RetrievalRecallAtK(chunk_size=0)
    metric = RetrievalRecallAtK()
    with pytest.raises(ValueError):
        metric.update(torch.randn(3, 4), torch.arange(2), torch.randn(3, 4), torch.arange(3))
    with pytest.raises(ValueError):
        RetrievalRecallAtK().compute()


# ---------------------------------------------------------------------------------------------------------------
# build_zero_shot_classifier
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    model = open_clip.CLIP(**copy.deepcopy(TINY_VIT))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    return model, tokenizer


CLASSNAMES = ["circle", "star", "striped triangle"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "{} on a white background"]


def test_format_prompts():
    assert format_prompts("cat", ["a {}.", "the {c} and the {c}", lambda c: c.upper(), "plain", "{0}/{c}"]) == [
        "a cat.",
        "the cat and the cat",
        "CAT",
        "plain",
        "cat/cat",
    ]


def test_zero_shot_classifier_is_the_renormalised_mean_of_normalised_text_embeddings(tiny_clip):
    model, tokenizer = tiny_clip
    model.eval()
    weights = build_zero_shot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES)
    assert weights.shape == (TINY_VIT["embed_dim"], len(CLASSNAMES))
    assert torch.allclose(weights.norm(dim=0), torch.ones(len(CLASSNAMES)), atol=1e-5)

    with torch.no_grad():
        columns = []
        for name in CLASSNAMES:
            tokens = tokenizer([t.format(name) for t in TEMPLATES])
            embeddings = model.encode_text(tokens, normalize=True)
            columns.append(F.normalize(embeddings.mean(0), dim=0))
    manual = torch.stack(columns, dim=1)
    torch.testing.assert_close(weights, manual, atol=1e-5, rtol=1e-5)
    # several templates really are averaged: one template alone gives a different classifier
    single = build_zero_shot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES[:1])
    assert (single - weights).abs().max() > 1e-3


def test_zero_shot_classifier_template_styles_agree(tiny_clip):
    model, tokenizer = tiny_clip
    positional = build_zero_shot_classifier(model, tokenizer, CLASSNAMES, ["a photo of a {}.", "art of the {}"])
    keyword = build_zero_shot_classifier(model, tokenizer, CLASSNAMES, ["a photo of a {c}.", "art of the {c}"])
    functions = build_zero_shot_classifier(
        model, tokenizer, CLASSNAMES, [lambda c: f"a photo of a {c}.", lambda c: "art of the " + c]
    )
    mixed = build_zero_shot_classifier(model, tokenizer, CLASSNAMES, ("a photo of a {c}.", lambda c: f"art of the {c}"))
    torch.testing.assert_close(positional, keyword, rtol=0, atol=0)
    torch.testing.assert_close(positional, functions, rtol=0, atol=0)
    torch.testing.assert_close(positional, mixed, rtol=0, atol=0)


def test_zero_shot_classifier_rejects_empty_inputs(tiny_clip):
    model, tokenizer = tiny_clip
    with pytest.raises(ValueError, match="classnames"):
        build_zero_shot_classifier(model, tokenizer, [], TEMPLATES)
    with pytest.raises(ValueError, match="templates"):
        build_zero_shot_classifier(model, tokenizer, CLASSNAMES, [])


@pytest.mark.parametrize("training", [True, False])
def test_zero_shot_classifier_runs_in_eval_mode_and_restores_the_mode(tiny_clip, training):
    model, tokenizer = tiny_clip
    model.train(training)
    seen = []
    handle = model.ln_final.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        build_zero_shot_classifier(model, tokenizer, CLASSNAMES[:2], TEMPLATES[:2])
    finally:
        handle.remove()
    assert seen and not any(seen)  # text tower evaluated in eval mode
    assert all(m.training == training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_zero_shot_classifier_feeds_zero_shot_accuracy(tiny_clip):
    """End to end: classifying the class prompts' own text embeddings with the ensemble classifier is perfect."""
    model, tokenizer = tiny_clip
    model.eval()
    weights = build_zero_shot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES[:1])
    with torch.no_grad():
        queries = model.encode_text(tokenizer([TEMPLATES[0].format(c) for c in CLASSNAMES]))
    metric = ZeroShotAccuracy(weights, top_k=(1,))
    metric.update(queries, torch.arange(len(CLASSNAMES)))
    assert _values(metric.compute()) == {"acc1": 1.0, "mean_per_class_recall": 1.0}


# ---------------------------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------------------------
def _load_ddp_script():
    spec = importlib.util.spec_from_file_location("_ddp_metrics_script", DDP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.ddp
def test_ddp_metrics_with_padding_equal_the_single_process_numbers(tmp_path):
    """2 CPU ranks (gloo), 101 samples through Lightning's padding DistributedSampler: with ids, the numbers are
    the single-process ones; the id-less accuracy visibly counts the padded duplicate."""
    script = _load_ddp_script()
    out = tmp_path / "ddp.json"
    result = subprocess.run(
        [sys.executable, str(DDP_SCRIPT), str(out), "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads(out.read_text())
    single = script.single_process_metrics()

    assert ddp["world_size"] == 2
    assert ddp["samples_per_rank"] == [51, 51]  # 101 samples padded to 102
    assert ddp["sampler"] == "DistributedSampler"
    assert single["unique_total"] == script.NUM_SAMPLES
    assert ddp["padded_total"] == script.NUM_SAMPLES + 1  # without ids the padded sample counts twice

    for group in ("accuracy", "retrieval", "retrieval_rows"):
        assert ddp[group].keys() == single[group].keys()
        for key, value in single[group].items():
            assert ddp[group][key] == pytest.approx(value, abs=1e-6), (group, key)
    data = script.make_data()
    texts = data["captions"].reshape(-1, script.DIM)
    brute = _brute_force_recall(
        data["image"], data["id"], texts, data["id"].repeat_interleave(script.CAPTIONS), (1, 5, 10)
    )
    _assert_same(single["retrieval"], brute)
    assert 0.0 < single["accuracy"]["acc1"] < 1.0
    assert 0.0 < single["retrieval"]["image_retrieval_recall@1"] < 1.0
