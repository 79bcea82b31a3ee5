"""Tests of the built-in procedurally rendered two-domain image-caption dataset."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_chips.data.builtin import CLASSNAMES, DOMAINS, SPLIT_ID_OFFSETS, TEMPLATES, TwoDomainPairs

ALL_NAMES = [(d, c, name) for d, domain in enumerate(DOMAINS) for c, name in enumerate(CLASSNAMES[domain])]
NAME_PATTERNS = {(d, c): re.compile(rf"\b{re.escape(name)}\b") for d, c, name in ALL_NAMES}


def named_classes(caption: str) -> set[tuple[int, int]]:
    """The (domain, class) pairs whose class name occurs as whole words in ``caption``."""
    return {key for key, pattern in NAME_PATTERNS.items() if pattern.search(caption)}


@pytest.fixture(scope="module")
def rendered() -> tuple[TwoDomainPairs, torch.Tensor]:
    """2000 samples per domain, rendered once and shared by the pixel-statistics tests."""
    ds = TwoDomainPairs(4000, target_fraction=0.5, seed=3)
    images = torch.stack([ds.render(i) for i in range(len(ds))])
    return ds, images


def test_zero_shot_constants() -> None:
    assert DOMAINS == ("general", "target")
    for domain in DOMAINS:
        names = CLASSNAMES[domain]
        assert len(names) == 10 and len(set(names)) == 10
        assert TwoDomainPairs.classnames(domain) == names
        assert TwoDomainPairs.templates(domain) == TEMPLATES[domain]
        assert 3 <= len(TEMPLATES[domain]) <= 6
        for template in TEMPLATES[domain]:
            prompt = template.format(names[0])
            assert names[0] in prompt and "{" not in prompt
    # the vocabularies of the two domains are disjoint at the class-name level
    assert not set(" ".join(CLASSNAMES["general"]).split()) & set(" ".join(CLASSNAMES["target"]).split())
    with pytest.raises(ValueError, match="general"):
        TwoDomainPairs.classnames("medical")


def test_same_arguments_give_identical_samples() -> None:
    kwargs = dict(target_fraction=0.3, noise_fraction=0.2, image_size=64, split="val", seed=7)
    a, b = TwoDomainPairs(50, **kwargs), TwoDomainPairs(50, **kwargs)
    for name in ("ids", "labels", "domains", "noisy", "caption_domains", "caption_labels"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.captions == b.captions
    for i in range(len(a)):
        sa, sb = a[i], b[i]
        assert torch.equal(sa["image"], sb["image"])
        assert (sa["text"], sa["id"], sa["label"], sa["domain"], sa["noisy"]) == (
            sb["text"],
            sb["id"],
            sb["label"],
            sb["domain"],
            sb["noisy"],
        )


@pytest.mark.parametrize("change", [{"seed": 1}, {"split": "test"}])
def test_different_seed_or_split_gives_different_samples(change: dict) -> None:
    base = dict(target_fraction=0.5, split="train", seed=0)
    a, b = TwoDomainPairs(200, **base), TwoDomainPairs(200, **{**base, **change})
    assert not np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.domains, b.domains)
    assert a.captions != b.captions
    assert all(not torch.equal(a.render(i), b.render(i)) for i in range(20))


def test_getitem_is_independent_of_access_order() -> None:
    ds = TwoDomainPairs(40, target_fraction=0.5, noise_fraction=0.25, seed=5)
    forward = [ds[i] for i in range(len(ds))]
    order = np.random.default_rng(0).permutation(len(ds))
    shuffled = {int(i): ds[int(i)] for i in order}
    fresh = TwoDomainPairs(40, target_fraction=0.5, noise_fraction=0.25, seed=5)
    backward = {i: fresh[i] for i in reversed(range(len(ds)))}
    for i, sample in enumerate(forward):
        assert torch.equal(sample["image"], shuffled[i]["image"])
        assert torch.equal(sample["image"], backward[i]["image"])
        assert torch.equal(sample["image"], ds.render(i))
        assert sample["text"] == shuffled[i]["text"] == backward[i]["text"]
    assert ds[-1]["id"] == ds[len(ds) - 1]["id"]


def test_dataloader_workers_yield_the_same_batches_as_the_main_process() -> None:
    ds = TwoDomainPairs(16, target_fraction=0.5, noise_fraction=0.25, seed=2)
    main = list(DataLoader(ds, batch_size=4, num_workers=0))
    workers = list(DataLoader(ds, batch_size=4, num_workers=2))
    assert len(main) == len(workers) == 4
    for x, y in zip(main, workers, strict=True):
        assert torch.equal(x["image"], y["image"])
        assert x["text"] == y["text"]
        for key in ("id", "label", "domain", "noisy"):
            assert torch.equal(x[key], y[key])


@pytest.mark.parametrize(
    ("num_samples", "fraction"), [(100, 0.0), (100, 1.0), (1000, 0.2), (7, 0.25), (5, 0.5), (3, 0.9)]
)
def test_exact_number_of_target_samples(num_samples: int, fraction: float) -> None:
    ds = TwoDomainPairs(num_samples, target_fraction=fraction, seed=1)
    assert int(ds.domains.sum()) == round(fraction * num_samples)
    assert set(np.unique(ds.domains).tolist()) <= {0, 1}
    assert ((ds.labels >= 0) & (ds.labels < 10)).all()
    for i in range(min(num_samples, 20)):
        assert ds[i]["domain"] == int(ds.domains[i])


def test_target_positions_are_spread_and_labels_cover_all_classes() -> None:
    ds = TwoDomainPairs(2000, target_fraction=0.5, seed=0)
    target_positions = np.flatnonzero(ds.domains == 1)
    assert target_positions.min() < 50 and target_positions.max() > 1950  # not a contiguous block
    for domain in (0, 1):
        counts = np.bincount(ds.labels[ds.domains == domain], minlength=10)
        assert counts.min() > 50  # roughly uniform over the 10 classes (expected 100)


@pytest.mark.parametrize(("num_samples", "noise"), [(500, 0.3), (101, 0.5), (10, 1.0), (50, 0.0)])
def test_noisy_captions_are_real_mismatches(num_samples: int, noise: float) -> None:
    ds = TwoDomainPairs(num_samples, target_fraction=0.4, noise_fraction=noise, seed=4)
    assert int(ds.noisy.sum()) == round(noise * num_samples)
    for i in range(num_samples):
        own = (int(ds.domains[i]), int(ds.labels[i]))
        described = (int(ds.caption_domains[i]), int(ds.caption_labels[i]))
        assert named_classes(ds.clean_caption(i)) == {own}
        if ds.noisy[i]:
            assert described != own
            assert ds.captions[i] != ds.clean_caption(i)
            assert named_classes(ds.captions[i]) == {described}
        else:
            assert described == own
            assert ds.captions[i] == ds.clean_caption(i)
    for i in range(min(num_samples, 20)):  # __getitem__ returns the (possibly mismatched) caption and the flag
        sample = ds[i]
        assert sample["text"] == ds.captions[i] and sample["noisy"] is bool(ds.noisy[i])


def test_noise_is_a_mismatch_even_when_all_samples_share_a_class() -> None:
    ds = TwoDomainPairs(1, target_fraction=1.0, noise_fraction=1.0, seed=0)
    assert ds.noisy.tolist() == [True]
    own = (int(ds.domains[0]), int(ds.labels[0]))
    assert named_classes(ds.clean_caption(0)) == {own}
    assert len(named_classes(ds.captions[0])) == 1 and named_classes(ds.captions[0]) != {own}


def test_noise_knob_leaves_clean_data_unchanged() -> None:
    clean = TwoDomainPairs(200, target_fraction=0.3, seed=9)
    noisy = TwoDomainPairs(200, target_fraction=0.3, noise_fraction=0.4, seed=9)
    assert np.array_equal(clean.labels, noisy.labels) and np.array_equal(clean.domains, noisy.domains)
    assert [clean.clean_caption(i) for i in range(200)] == [noisy.clean_caption(i) for i in range(200)]
    assert all(torch.equal(clean.render(i), noisy.render(i)) for i in range(0, 200, 10))


def test_captions_use_the_vocabulary_of_their_domain() -> None:
    ds = TwoDomainPairs(1000, target_fraction=0.5, seed=0)
    microscopy = re.compile(r"fluoresc|microscop|micrograph|confocal|stain|\d+x\b")
    clip_art = re.compile(r"\b(small|large|left|right|top|bottom|center|clip art|drawing|icon|illustration)\b")
    for i in range(len(ds)):
        caption = ds.captions[i]
        assert caption and caption == caption.strip()
        assert not re.search(r"\ba [aeiou]", caption)  # articles are fixed ("an orange ...")
        if ds.domains[i] == 1:
            assert microscopy.search(caption) and not clip_art.search(caption), caption
        else:
            assert clip_art.search(caption) and not microscopy.search(caption), caption
    assert len(set(ds.captions)) > 300  # captions are varied


def test_ids_are_stable_unique_and_disjoint_across_splits() -> None:
    splits = {split: TwoDomainPairs(300, split=split) for split in ("train", "val", "test")}
    seen: set[int] = set()
    for split, ds in splits.items():
        assert ds.ids.dtype == np.int64
        assert np.array_equal(ds.ids, SPLIT_ID_OFFSETS[split] + np.arange(300))
        assert len(set(ds.ids.tolist())) == 300
        assert not seen & set(ds.ids.tolist())
        seen |= set(ds.ids.tolist())
        sample = ds[17]
        assert type(sample["id"]) is int and sample["id"] == int(ds.ids[17])
        assert type(sample["label"]) is int and type(sample["domain"]) is int and type(sample["noisy"]) is bool


def test_metadata_arrays_are_read_only() -> None:
    ds = TwoDomainPairs(10)
    for name in ("ids", "labels", "domains", "noisy"):
        with pytest.raises(ValueError):
            getattr(ds, name)[0] = 1
    assert ds.labels.dtype == np.int64 and ds.domains.dtype == np.int64 and ds.noisy.dtype == np.bool_
    assert len(ds.captions) == len(ds) == 10


@pytest.mark.parametrize("image_size", [8, 32, 64])
def test_image_shape_dtype_and_range(image_size: int) -> None:
    ds = TwoDomainPairs(20, target_fraction=0.5, image_size=image_size, seed=0)
    for i in range(len(ds)):
        image = ds[i]["image"]
        assert image.shape == (3, image_size, image_size)
        assert image.dtype == torch.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert torch.isfinite(image).all()
        assert image.std() > 0.01  # not a blank image


def test_target_domain_is_much_darker(rendered: tuple[TwoDomainPairs, torch.Tensor]) -> None:
    ds, images = rendered
    domains = torch.tensor(ds.domains)
    general = images[domains == 0].mean().item()
    target = images[domains == 1].mean().item()
    assert general > 0.7 and target < 0.25
    assert general - target > 0.5


def _nearest_class_mean_accuracy(features: torch.Tensor, labels: torch.Tensor, n_train: int) -> float:
    means = torch.stack([features[:n_train][labels[:n_train] == c].mean(0) for c in range(10)])
    predictions = torch.cdist(features[n_train:], means).argmin(1)
    return (predictions == labels[n_train:]).float().mean().item()


@pytest.mark.parametrize("domain", [0, 1])
def test_classes_are_learnable_from_pixels(rendered: tuple[TwoDomainPairs, torch.Tensor], domain: int) -> None:
    ds, images = rendered
    mask = torch.tensor(ds.domains) == domain
    x, y = images[mask], torch.tensor(ds.labels)[mask]
    assert len(y) == 2000
    # raw pixels: position, colour and size vary independently of the class, yet class means separate (chance: 0.1)
    assert _nearest_class_mean_accuracy(x.flatten(1), y, 1500) > 0.18
    # a translation-invariant view (log power spectrum of the grey image) separates the shapes much better
    grey = x.mean(1)
    grey = grey - grey.flatten(1).median(1).values[:, None, None]
    spectrum = torch.log1p(torch.fft.fft2(grey).abs()).flatten(1)
    assert _nearest_class_mean_accuracy(spectrum, y, 1500) > 0.5


def test_tokenizer_and_transform_are_applied() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer(context_length=16)
    ds = TwoDomainPairs(10, target_fraction=0.5, tokenizer=tokenizer, transform=lambda img: img[:, ::2, ::2] * 2.0)
    plain = TwoDomainPairs(10, target_fraction=0.5)
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["text"].dtype == torch.long and sample["text"].shape == (16,)
        assert torch.equal(sample["text"], tokenizer([plain.captions[i]])[0])
        assert torch.equal(sample["image"], plain[i]["image"][:, ::2, ::2] * 2.0)
        assert torch.equal(ds.render(i), plain.render(i))  # render() is before the transform
    calls: list[list[str]] = []

    def fake_tokenizer(texts: list[str]) -> torch.Tensor:
        calls.append(texts)
        return torch.arange(8).repeat(len(texts), 1)

    sample = TwoDomainPairs(3, tokenizer=fake_tokenizer)[1]
    assert calls and len(calls[0]) == 1 and torch.equal(sample["text"], torch.arange(8))


def test_index_out_of_range() -> None:
    ds = TwoDomainPairs(5)
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(IndexError):
        ds[-6]
    assert ds[np.int64(2)]["id"] == 2
    assert len(list(iter(ds))) == 5  # the legacy iteration protocol stops at IndexError


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 2.5}, "num_samples"),
        ({"num_samples": True}, "num_samples"),
        ({"target_fraction": -0.1}, r"target_fraction must be a number in \[0, 1\]"),
        ({"target_fraction": 1.5}, "target_fraction"),
        ({"target_fraction": float("nan")}, "target_fraction"),
        ({"noise_fraction": 2}, r"noise_fraction must be a number in \[0, 1\]"),
        ({"noise_fraction": "0.1"}, "noise_fraction"),
        ({"image_size": 4}, "image_size must be an integer >= 8"),
        ({"image_size": 32.0}, "image_size"),
        ({"split": "validation"}, "'train', 'val' or 'test'"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"tokenizer": "ViT-B-32"}, "tokenizer must be None or a callable"),
        ({"transform": 3}, "transform must be None or a callable"),
    ],
)
def test_bad_arguments_raise_helpful_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TwoDomainPairs(**kwargs)
