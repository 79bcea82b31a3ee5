"""Tests of the real offline datasets (openclipart, Fashion-MNIST, Animal-MNIST) as map-style pools with ids.

They need the data installed (``bash benchmarks/setup_data.sh``); without it each test is skipped with the reason.
"""

from __future__ import annotations

import gzip
import os
import random
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader

from lightning_chips.data.builtin import SPLIT_ID_OFFSETS
from lightning_chips.datasets.real import (
    ANIMAL_CLASSES,
    CATEGORIES,
    DATASET_ID_OFFSETS,
    FASHION_CLASSES,
    REAL_DOMAINS,
    AnimalMNISTPairs,
    DataNotInstalledError,
    FashionMNISTPairs,
    OpenClipartPairs,
)

SPLITS = ("train", "val", "test")
CLIPART_ROOT = Path("/usr/share/openclipart")
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
SKIP_REASONS = {
    "duplicate_image",
    "missing_png",
    "missing_svg",
    "unreadable_png",
    "unknown_category",
    "no_text",
    "too_large",
}
REPO = Path(__file__).resolve().parents[1]


def _load(factory: Callable[[], object]):
    try:
        return factory()
    except DataNotInstalledError as err:
        pytest.skip(f"real data not installed (run `bash benchmarks/setup_data.sh`): {err}")


@pytest.fixture(scope="module")
def clipart() -> dict[str, OpenClipartPairs]:
    return {s: _load(lambda s=s: OpenClipartPairs(s, image_size=32)) for s in SPLITS}


@pytest.fixture(scope="module")
def fashion() -> dict[str, FashionMNISTPairs]:
    return {s: _load(lambda s=s: FashionMNISTPairs(s, image_size=28, noise_fraction=0.25, seed=3)) for s in SPLITS}


@pytest.fixture(scope="module")
def animal() -> dict[str, AnimalMNISTPairs]:
    return {s: _load(lambda s=s: AnimalMNISTPairs(s, image_size=28, noise_fraction=0.25, seed=3)) for s in SPLITS}


def _svg_caption_by_xml(svg: Path) -> str:
    """The caption rebuilt with a full XML parse: the work's title then its keywords, de-duplicated."""
    ns = {"cc": "http://web.resource.org/cc/", "dc": "http://purl.org/dc/elements/1.1/"}
    ns["rdf"] = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
    work = ET.parse(svg).getroot().find(".//cc:Work", ns)
    title = work.find("dc:title", ns)
    parts = [" ".join((title.text or "").split())] if title is not None else []
    parts += [" ".join((li.text or "").split()) for li in work.findall("dc:subject/rdf:Bag/rdf:li", ns)]
    unique: dict[str, str] = {}
    for part in parts:
        if part:
            unique.setdefault(part.lower(), part)
    return ", ".join(unique.values())


# --- openclipart -------------------------------------------------------------------------------------------------
def test_openclipart_caption_is_the_svg_title_and_keywords(clipart) -> None:
    known = "animals/bugs/flying_wasp_gerald_g._01.png"  # <dc:title>Flying Wasp</dc:title>, keywords insect ...
    [(split, i)] = [(s, i) for s in SPLITS for i, p in enumerate(clipart[s].paths) if p == known]
    ds = clipart[split]
    assert ds.captions[i] == "Flying Wasp, insect, animal, wasp"
    assert ds.labels[i] == CATEGORIES.index("animals") and ds.classnames[ds.labels[i]] == "animals"
    # the fast head-of-file scan agrees with a full XML parse of the SVG on a sample of every split
    rng = random.Random(0)
    for s in SPLITS:
        for i in rng.sample(range(len(clipart[s])), 15):
            svg = CLIPART_ROOT / "svg" / (clipart[s].paths[i][: -len(".png")] + ".svg")
            assert clipart[s].captions[i] == _svg_caption_by_xml(svg), svg


def test_openclipart_splits_are_disjoint_cover_the_tree_and_report_skips(clipart) -> None:
    stems = set()
    for tree, suffix in (("png", ".png"), ("svg", ".svg")):
        for directory, _, names in os.walk(CLIPART_ROOT / tree):
            rel = Path(directory).relative_to(CLIPART_ROOT / tree)
            stems |= {(rel / n[: -len(suffix)]).as_posix() for n in names if n.endswith(suffix)}
    paths = {s: set(clipart[s].paths) for s in SPLITS}
    assert not (paths["train"] & paths["val"] or paths["train"] & paths["test"] or paths["val"] & paths["test"])
    # every file pair of the tree is either a pair of exactly one split or counted as skipped with a reason
    assert sum(len(clipart[s]) + sum(clipart[s].skipped.values()) for s in SPLITS) == len(stems)
    for s in SPLITS:
        assert set(clipart[s].skipped) <= SKIP_REASONS
    # the same drawing filed twice (a symlink to another PNG of the tree) is kept once, never in two splits
    real_files = [os.path.realpath(CLIPART_ROOT / "png" / p) for s in SPLITS for p in clipart[s].paths]
    assert len(set(real_files)) == len(real_files)
    links_inside = 0
    png_root = os.path.realpath(CLIPART_ROOT / "png") + os.sep
    for directory, _, names in os.walk(CLIPART_ROOT / "png"):
        for n in names:
            path = os.path.join(directory, n)
            links_inside += os.path.islink(path) and os.path.realpath(path).startswith(png_root)
    assert sum(clipart[s].skipped.get("duplicate_image", 0) for s in SPLITS) == links_inside
    # the split is 80 / 10 / 10 % of the drawings, up to hashing noise
    sizes = np.array([len(clipart[s]) for s in SPLITS], dtype=float)
    np.testing.assert_allclose(sizes / sizes.sum(), [0.8, 0.1, 0.1], atol=0.02)
    assert len(set(clipart["train"].labels.tolist())) == len(CATEGORIES)  # all 22 categories occur


def test_openclipart_split_and_ids_ignore_seed_noise_and_max_pixels(clipart) -> None:
    val = clipart["val"]
    other = OpenClipartPairs("val", image_size=32, seed=7, noise_fraction=0.3)
    assert other.paths == val.paths and np.array_equal(other.ids, val.ids) and np.array_equal(other.labels, val.labels)
    assert [other.clean_caption(i) for i in range(len(other))] == val.captions
    small = OpenClipartPairs("val", image_size=32, max_pixels=200_000)
    assert 0 < len(small) < len(val)
    assert small.skipped["too_large"] - val.skipped.get("too_large", 0) == len(val) - len(small)
    by_id = dict(zip(val.ids.tolist(), val.captions, strict=True))
    assert all(by_id[i] == c for i, c in zip(small.ids.tolist(), small.captions, strict=True))


def test_openclipart_noise_swaps_in_captions_of_other_categories(clipart) -> None:
    clean = clipart["test"]
    noisy = OpenClipartPairs("test", image_size=32, noise_fraction=0.3, seed=1)
    again = OpenClipartPairs("test", image_size=32, noise_fraction=0.3, seed=1)
    assert noisy.captions == again.captions and np.array_equal(noisy.noisy, again.noisy)
    assert int(noisy.noisy.sum()) == round(0.3 * len(noisy))
    donors = {}
    for caption, label in zip(clean.captions, clean.labels.tolist(), strict=True):
        donors.setdefault(caption, set()).add(label)
    for i in range(len(noisy)):
        if noisy.noisy[i]:
            assert noisy.caption_labels[i] != noisy.labels[i] and noisy.caption_labels[i] in donors[noisy.captions[i]]
        else:
            assert noisy.captions[i] == clean.captions[i]


def test_openclipart_images_are_composited_onto_white_and_padded(clipart) -> None:
    from PIL import Image

    ds = clipart["val"]
    wide = None
    for i, path in enumerate(ds.paths):
        with Image.open(CLIPART_ROOT / "png" / path) as raw:
            if raw.width >= 2 * raw.height:
                wide = i
                break
    assert wide is not None
    image = ds.load_image(wide)
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert torch.all(image[:, :4] == 1.0) and torch.all(image[:, -4:] == 1.0)  # white padding above and below
    item = OpenClipartPairs("val", image_size=48, transform=lambda x: x * 2)[wide]
    assert item["image"].shape == (3, 48, 48) and float(item["image"].max()) == 2.0


# --- Fashion-MNIST and Animal-MNIST ------------------------------------------------------------------------------
def _caption_classes(ds) -> dict[str, int]:
    """Every caption the dataset's templates can give -> the class it names ("a" before a vowel becomes "an")."""
    return {
        re.sub(r"\ba (?=[aeiou])", "an ", template.format(name)): k
        for k, name in enumerate(ds.classnames)
        for template in ds.templates
    }


@pytest.mark.parametrize("name", ["fashion", "animal"])
def test_templated_captions_name_the_label_unless_noisy(name, request) -> None:
    for ds in request.getfixturevalue(name).values():
        classes = _caption_classes(ds)
        named = np.array([classes[c] for c in ds.captions])
        assert np.array_equal(named, ds.caption_labels)
        assert np.array_equal(named == ds.labels, ~ds.noisy)
        assert int(ds.noisy.sum()) == round(0.25 * len(ds))
        assert all(classes[ds.clean_caption(i)] == ds.labels[i] for i in range(0, len(ds), 97))
        assert len({c.split(" ")[2] for c in ds.captions[:200]}) > 2  # several templates are used


def test_noise_leaves_templates_unchanged_and_seed_changes_them(fashion) -> None:
    val = fashion["val"]
    clean = FashionMNISTPairs("val", noise_fraction=0.0, seed=3)
    assert [val.clean_caption(i) for i in range(len(val))] == clean.captions
    assert FashionMNISTPairs("val", noise_fraction=0.0, seed=4).captions != clean.captions
    assert np.array_equal(FashionMNISTPairs("val", seed=4).labels, clean.labels)  # the split ignores the seed


def test_fashion_splits_follow_the_official_files(fashion) -> None:
    assert [len(fashion[s]) for s in SPLITS] == [55_000, 5_000, 10_000]
    with gzip.open(FASHION_ROOT / "train-labels-idx1-ubyte.gz") as f:
        train_labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    with gzip.open(FASHION_ROOT / "train-images-idx3-ubyte.gz") as f:
        train_images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    assert np.array_equal(fashion["train"].labels, train_labels[:55_000])
    assert np.array_equal(fashion["val"].labels, train_labels[55_000:])
    image = fashion["val"].load_image(3)  # image_size=28 keeps the original pixels, repeated over 3 channels
    assert image.shape == (3, 28, 28) and torch.equal(image[0], image[2])
    assert torch.equal((image[0] * 255).round().to(torch.uint8), torch.from_numpy(train_images[55_003].copy()))
    assert np.bincount(fashion["test"].labels).tolist() == [1000] * len(FASHION_CLASSES)


def test_animal_split_is_stratified_fixed_and_interleaved(animal) -> None:
    for s, per_class in zip(SPLITS, (700, 100, 200), strict=True):
        assert np.bincount(animal[s].labels, minlength=10).tolist() == [per_class] * len(ANIMAL_CLASSES)
        assert len(set(animal[s].labels[:50].tolist())) >= 8  # a prefix mixes the classes
    sources = np.concatenate([animal[s].source_indices for s in SPLITS])
    assert np.array_equal(np.sort(sources), np.arange(10_000))
    assert np.array_equal(AnimalMNISTPairs("test", seed=99).source_indices, animal["test"].source_indices)
    big = AnimalMNISTPairs("val", image_size=64)
    image = big[5]["image"]
    assert image.shape == (3, 64, 64) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert float(image.max()) > 0.9 and float(image.min()) < 0.1  # a white silhouette on black


# --- ids, pools and subsets --------------------------------------------------------------------------------------
def test_ids_are_unique_across_datasets_and_splits_and_in_their_documented_block(clipart, fashion, animal) -> None:
    all_ids = []
    for dataset, group in zip(REAL_DOMAINS, (clipart, fashion, animal), strict=True):
        for s in SPLITS:
            ids = group[s].ids
            low = DATASET_ID_OFFSETS[dataset] + SPLIT_ID_OFFSETS[s]
            assert ids.dtype == np.int64 and ids.min() >= low and ids.max() < low + 10**9
            all_ids.append(ids)
    ids = np.concatenate(all_ids)
    assert len(np.unique(ids)) == len(ids)
    assert ids.min() >= 10**10  # clear of the built-in two-domain data's ids


def test_subsets_and_mixed_pools_keep_ids_captions_and_item_keys(clipart, fashion, animal) -> None:
    train = animal["train"]
    few = train.subset(range(10, 110))
    assert np.array_equal(few.ids, train.ids[10:110]) and few.captions == train.captions[10:110]
    assert np.array_equal(few.noisy, train.noisy[10:110]) and few.clean_caption(0) == train.clean_caption(10)
    fewer = few.subset(np.array([3, -1]))
    assert fewer.ids.tolist() == [train.ids[13], train.ids[109]]
    same = AnimalMNISTPairs("train", image_size=28, noise_fraction=0.25, seed=3, indices=range(10, 110))
    assert np.array_equal(same.ids, few.ids) and torch.equal(same[7]["image"], few[7]["image"])
    with pytest.raises(ValueError, match="duplicates"):
        train.subset([1, 1])
    with pytest.raises(IndexError):
        few.subset([100])

    pool = ConcatDataset([clipart["test"].subset(range(4)), fashion["test"].subset(range(4)), few.subset(range(4))])
    items = [pool[i] for i in range(len(pool))]
    assert all(sorted(x) == ["domain", "id", "image", "label", "noisy", "text"] for x in items)
    assert [x["domain"] for x in items] == [0] * 4 + [1] * 4 + [2] * 4
    resized = ConcatDataset([OpenClipartPairs("test", image_size=28).subset(range(4)), few.subset(range(4))])
    batch = next(iter(DataLoader(resized, batch_size=8)))
    assert batch["image"].shape == (8, 3, 28, 28) and batch["id"].dtype == torch.int64
    assert len(set(batch["id"].tolist())) == 8


def test_tokenizer_is_applied_to_the_caption(animal) -> None:
    def tokenizer(texts: list[str]) -> torch.Tensor:
        return torch.tensor([[len(t)] for t in texts])

    ds = AnimalMNISTPairs("val", tokenizer=tokenizer)
    assert ds[0]["text"].tolist() == [len(ds.captions[0])]


# --- missing data and the set-up script --------------------------------------------------------------------------
def test_missing_data_errors_say_how_to_install(tmp_path, monkeypatch) -> None:
    with pytest.raises(DataNotInstalledError, match="apt-get install -y openclipart-png openclipart-svg") as err:
        OpenClipartPairs(root=tmp_path)
    assert "benchmarks/setup_data.sh" in str(err.value)
    with pytest.raises(DataNotInstalledError, match="apt-get install -y dataset-fashion-mnist"):
        FashionMNISTPairs(root=tmp_path)
    with pytest.raises(DataNotInstalledError, match=r"pip download --no-deps animal-mnist==0\.4"):
        AnimalMNISTPairs(root=tmp_path)
    import importlib.util

    monkeypatch.setenv("LIGHTNING_CHIPS_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataNotInstalledError, match=re.escape(str(tmp_path / "empty" / "animal-mnist"))):
        AnimalMNISTPairs()
    assert issubclass(DataNotInstalledError, FileNotFoundError)


def test_animal_mnist_reads_the_data_cache_folder(tmp_path, monkeypatch) -> None:
    """The set-up script unpacks Animal-MNIST's arrays into ``$LIGHTNING_CHIPS_DATA/animal-mnist``; the dataset reads
    them there without the package being installed."""
    source = _load(lambda: AnimalMNISTPairs("val", image_size=28))
    import importlib.util

    from lightning_chips.datasets.real import _ANIMAL_FILES, _animal_dir, data_cache_dir

    folder = tmp_path / "data" / "animal-mnist"
    folder.mkdir(parents=True)
    for name in _ANIMAL_FILES:
        (folder / name).write_bytes((_animal_dir(None) / name).read_bytes())
    monkeypatch.setenv("LIGHTNING_CHIPS_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # no installed package to fall back on
    assert data_cache_dir() == tmp_path / "data"
    assert _animal_dir(None) == folder
    cached = AnimalMNISTPairs("val", image_size=28, root=None)
    assert cached.captions == source.captions and cached.labels.tolist() == source.labels.tolist()
    assert torch.equal(cached[5]["image"], source[5]["image"])


def test_test_environment_passes_pip_check() -> None:
    """The test set-up command installs nothing with broken requirements (Animal-MNIST's wheel, whose metadata pulls
    tensorflow, is unpacked, not installed)."""
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    if "No module named pip" in result.stderr:
        pytest.skip("this interpreter has no pip")
    assert result.returncode == 0, result.stdout + result.stderr


def test_setup_script_is_valid_and_fails_loudly() -> None:
    script = REPO / "benchmarks" / "setup_data.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {**os.environ, "SKIP_APT": "1"}
    bad = subprocess.run(["bash", str(script), "/nonexistent/python"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "not found" in bad.stderr
    ok = subprocess.run(["bash", str(script), sys.executable], env={**env, "SKIP_PIP": "1"}, capture_output=True)
    assert ok.returncode == 0
