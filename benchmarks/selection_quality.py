"""The CHIPS table in miniature, on real images and captions: scenario x method x budget -> target and general accuracy.

Protocol (docs/benchmarks/quality.md has the details and the measured tables):
  1. "Pretrained CLIP": TwoTowerCLIP (frozen EfficientNet-Lite0 + frozen MiniLM, trained linear heads and
     temperature) trained on a general pool: openclipart (train split) + Fashion-MNIST (train split).
  2. A CPT pool, one per scenario, and a target set for selection (Animal-MNIST validation pairs); test sets are
     disjoint from both.
     * ``standard``: a general-domain pool with an Animal-MNIST minority (13 %), 20 % mismatched captions in every
       part: the question is "find the target domain".
     * ``clean``: the standard pool without caption noise: what a noise filter costs when there is nothing to
       filter (a scenario built to make the plausibility weight lose).
     * ``indomain``: shaped like the paper's BIOMEDICA pool: mostly target domain (Animal-MNIST, 80 %) with a
       long-tailed class distribution (700 down to 35 pairs per class; the test set is uniform), 20 % mismatched
       and 15 % uninformative captions (generic strings, unrelated clip-art titles), and a general-domain minority.
       The question is "which target pairs are worth training on".
  3. Every method selects a budget of the pool once, with the pretrained model (the -reselect rows re-select every
     epoch through DataSelectionCallback); CPT then runs a fixed number of epochs over the subset from the same
     starting point, for each seed (the seed sets the data order and the seeded methods' randomness).
  4. Reported: target zero-shot acc1 (Animal-MNIST test), general zero-shot acc1 (Fashion-MNIST test), general
     retrieval recall@1/5 (held-out openclipart, mean of image->text and text->image), mean +- std over seeds; and
     what each selection holds: target-domain share, mismatched and uninformative caption shares, head-class share
     and class entropy of its target-domain part.
  5. CHIPS ablations (components, curvature mixing, sketch layout, damping sweeps of both solvers, the
     plausibility weight's settings) and end-point fidelity (Spearman between end-point and full-parameter
     alignment with the last tower blocks trainable).

The towers are frozen, so their features are computed once and cached (benchmarks/.cache; the sets every scenario
shares, the pretraining pool, the test sets and the prompts, in one file for all of them); CPT trains the heads on
the cached features, which is exactly the frozen-tower model.

    bash benchmarks/setup_data.sh                                  # data and weights (once)
    python benchmarks/selection_quality.py --quick                 # both scenarios, one seed, one budget (minutes)
    python benchmarks/selection_quality.py --out docs/benchmarks/quality   # the full tables, plots, results.json
    python benchmarks/selection_quality.py --scenario indomain     # one scenario
    python benchmarks/selection_quality.py --merge a/results.json b/results.json --out DIR   # runs made side by side
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402

from lightning_chips.callback import DataSelectionCallback  # noqa: E402
from lightning_chips.data.subset import ScoredSubsetDataModule  # noqa: E402
from lightning_chips.features import PairFeatures  # noqa: E402
from lightning_chips.metrics import RetrievalRecallAtK, ZeroShotAccuracy  # noqa: E402
from lightning_chips.models import TwoTowerCLIP  # noqa: E402
from lightning_chips.scoring import RoundContext, build_scorer  # noqa: E402
from lightning_chips.scoring.base import Scorer  # noqa: E402
from lightning_chips.selection import select  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------
SCENARIOS = ("standard", "indomain", "clean", "indomain-clean", "indomain-noisy")
VARIANTS = {
    "indomain-clean": ("indomain", {"indomain_mismatched": 0.0, "indomain_uninformative": 0.0, "noise_fraction": 0.0}),
    "indomain-noisy": ("indomain", {"indomain_mismatched": 0.45, "indomain_uninformative": 0.15,
                                    "noise_fraction": 0.45}),
}  # fmt: skip
"""Scenarios that are another scenario's pool with other caption noise: (base scenario, :class:`Config` changes).
They answer one question, how a noise weight behaves as the noise goes from none to most of the pool, so they run
:data:`VARIANT_METHODS` only."""


@dataclass
class Config:
    # the "pretrained CLIP" (both scenarios) and the test sets
    general_clipart: int = 3000
    general_fashion: int = 3000
    target_pairs: int = 100
    test_animal: int = 2000
    test_fashion: int = 2000
    test_clipart: int = 800
    # standard scenario: a general pool with a target-domain minority
    pool_clipart: int = 2500
    pool_fashion: int = 3000
    pool_animal: int = 800
    noise_fraction: float = 0.2
    # in-domain scenario: a long-tailed target-domain pool with noisy captions and a general minority
    indomain_head: int = 700
    indomain_tail: int = 35
    indomain_mismatched: float = 0.2
    indomain_uninformative: float = 0.15
    indomain_general: int = 300
    # training
    image_size: int = 64
    embed_dim: int = 128
    pretrain_epochs: int = 20
    cpt_epochs: int = 10
    batch_size: int = 128
    pretrain_lr: float = 2e-3
    cpt_lr: float = 5e-4
    budgets: tuple[float, ...] = (0.1, 0.2, 0.3)
    seeds: tuple[int, ...] = (0, 1, 2)
    ablations: bool = True
    reselect: bool = True
    fidelity_pairs: int = 150
    fidelity_targets: int = 32


QUICK = Config(
    general_clipart=600,
    general_fashion=600,
    pool_clipart=500,
    pool_fashion=500,
    pool_animal=250,
    indomain_head=120,
    indomain_tail=12,
    indomain_general=60,
    target_pairs=60,
    test_animal=500,
    test_fashion=500,
    test_clipart=300,
    pretrain_epochs=10,
    cpt_epochs=6,
    budgets=(0.3,),
    seeds=(0,),
    ablations=False,
    fidelity_pairs=0,
)

METHODS = ["random", "clipscore", "negclip", "normsim", "negclip+normsim", "clipcov", "clip_powered", "dot",
           "tracin", "trak", "chips", "chips+plausibility", "chips+adaptive", "chips-reselect",
           "chips+plausibility-reselect", "random-siglip", "chips-siglip"]  # fmt: skip
"""Every selection method of the table. ``chips`` is the paper's CHIPS (``CHIPS(components="paper")``);
``chips+plausibility`` multiplies it by the plausibility weight at a fixed ``gamma`` (:data:`FIXED`);
``chips+adaptive`` is ``CHIPS()``'s default (:data:`ADAPTIVE`): ``gamma`` scaled by the pool's estimated noise share,
the curvature mix by its estimated target-domain share;
``-reselect`` re-scores every epoch;
``-siglip`` runs the method with a model pretrained and continually pre-trained with SigLIP's sigmoid loss (a logit
bias in its end point) instead of InfoNCE, on the same pool: CHIPS then uses the sigmoid loss's gradients and
curvature (docs/methods.md, SigLIP)."""
SIGLIP = "-siglip"

PLAUSIBILITY = ("alignment", "learnability", "relevance", "plausibility")
PAPER = {"components": "paper", "alpha": 0.7}
"""The paper's CHIPS: ``CHIPS(**PAPER)`` (its ablations change one setting of it, the curvature mix stays 0.7)."""
FIXED = {"components": PLAUSIBILITY, "noise_adaptive": False, "alpha": 0.7}
"""The plausibility weight at a fixed ``gamma``, on the paper's curvature mix."""
ADAPTIVE = {"components": PLAUSIBILITY, "noise_adaptive": True, "alpha": "auto"}
"""``CHIPS()``: ``gamma`` set by the pool's estimated noise share, ``alpha`` by its estimated target-domain share."""

ABLATIONS = [
    "chips:components=alignment",
    "chips:components=alignment*learnability",
    "chips:alpha=0",
    "chips:sketch_layout=kronecker",
    *(f"chips:relative_damping={r}" for r in ("1e-4", "1e-2", "1e-1", "1")),
    "chips:curvature_samples=1024",
    *(f"chips:solver=kernel,curvature_samples=1024,relative_damping={r}" for r in ("1e-4", "1e-3", "1e-2", "1e-1",
                                                                                    "1")),
    "chips+plausibility:components=alignment*relevance*plausibility",
    "chips+plausibility:components=alignment*plausibility",
    "chips+plausibility:reference_steps=0",
    "chips+plausibility:plausibility_power=5",
    "chips+plausibility:plausibility_power=20",
]  # fmt: skip
"""CHIPS ablations, ``base:key=value,...`` with ``base`` ``chips`` (the paper's settings) or ``chips+plausibility``
and CHIPS keyword arguments (components joined by ``*``). The exact (kernel) solve needs an R x R Gram matrix over
R curvature atoms, so it runs with 1,024 curvature samples (R = 5,120), beside the sketch at 1,024."""
REFERENCES = ["full pool", "random 50%"]
VARIANT_METHODS = ["random", "trak", "chips", "chips+plausibility", "chips+adaptive"]


# ----------------------------------------------------------------------------------------------------------------
# data and the feature cache
# ----------------------------------------------------------------------------------------------------------------
FIELDS = ("ids", "image", "text", "labels", "noisy", "uninformative", "domain")
TARGET_DOMAIN = 2  # the Animal-MNIST domain index of lightning_chips.datasets.real.REAL_DOMAINS


@dataclass
class Features:
    """Cached tower features of a set of pairs (and what the composition tables need about them)."""

    ids: Tensor
    image: Tensor
    text: Tensor
    labels: Tensor
    noisy: Tensor
    uninformative: Tensor
    domain: Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, idx: Tensor) -> Features:
        return Features(*(getattr(self, f)[idx] for f in FIELDS))

    def pairs(self) -> PairFeatures:
        return PairFeatures(self.ids, self.image, self.text, self.labels)

    @staticmethod
    def cat(parts: list[Features]) -> Features:
        return Features(*(torch.cat([getattr(p, f) for p in parts]) for f in FIELDS))


class FeatureDataset(Dataset):
    def __init__(self, features: Features) -> None:
        self.f = features

    def __len__(self) -> int:
        return len(self.f)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.f.image[i], "text": self.f.text[i], "id": int(self.f.ids[i])}


class Towers:
    """The frozen pretrained towers, loaded once."""

    def __init__(self, image_size: int) -> None:
        self.model = TwoTowerCLIP(embed_dim=8, image_size=image_size).eval()
        self.tokenizer = self.model.get_tokenizer()

    @torch.no_grad()
    def texts(self, captions: list[str], batch: int = 256) -> Tensor:
        return torch.cat([self.model.text_features(self.tokenizer(captions[i : i + batch]))
                          for i in range(0, len(captions), batch)])  # fmt: skip

    @torch.no_grad()
    def encode(self, dataset: Dataset, description: str, workers: int = 2) -> Features:
        from tqdm.auto import tqdm

        loader = DataLoader(dataset, batch_size=128, num_workers=workers, collate_fn=_collate_raw)
        parts = []
        for batch in tqdm(loader, desc=f"features: {description}", leave=False, dynamic_ncols=True):
            parts.append(Features(batch["id"], self.model.image_features(batch["image"]), self.texts(batch["text"]),
                                  batch["label"], batch["noisy"], batch["uninformative"],
                                  batch["domain"]))  # fmt: skip
        return Features.cat(parts)


def _collate_raw(items: list[dict]) -> dict:
    return {
        "image": torch.stack([torch.as_tensor(x["image"]) for x in items]),
        "text": [x["text"] for x in items],
        "id": torch.as_tensor([int(x["id"]) for x in items], dtype=torch.int64),
        "label": torch.as_tensor([int(x.get("label", -1)) for x in items], dtype=torch.int64),
        "noisy": torch.as_tensor([bool(x.get("noisy", False)) for x in items]),
        "uninformative": torch.as_tensor([bool(x.get("uninformative", False)) for x in items]),
        "domain": torch.as_tensor([int(x.get("domain", -1)) for x in items], dtype=torch.int64),
    }


def _take(dataset: Dataset, count: int, offset: int = 0) -> Dataset:
    if offset + count > len(dataset):
        raise ValueError(f"{type(dataset).__name__} has {len(dataset)} pairs; the benchmark needs {offset + count}.")
    return torch.utils.data.Subset(dataset, range(offset, offset + count))


GENERIC_CAPTIONS = ("an image.", "a picture.", "photo", "untitled", "image.jpg", "stock photo", "thumbnail",
                    "no description available.", "click to enlarge", "a close-up.")  # fmt: skip
"""Uninformative captions of the in-domain scenario (half of them; the other half are unrelated clip-art titles)."""


class Recaptioned(Dataset):
    """Pairs of ``base`` with their captions replaced and flagged (the in-domain scenario's noisy captions)."""

    def __init__(self, base: Dataset, captions: list[str], noisy: np.ndarray, uninformative: np.ndarray) -> None:
        if not len(base) == len(captions) == len(noisy) == len(uninformative):
            raise ValueError("Recaptioned needs one caption and one flag of each kind per pair.")
        self.base, self.captions = base, captions
        self.noisy, self.uninformative = noisy, uninformative

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.base[i])
        item["text"] = self.captions[i]
        item["noisy"] = bool(self.noisy[i])
        item["uninformative"] = bool(self.uninformative[i])
        return item


def class_counts(cfg: Config, classes: int = 10) -> np.ndarray:
    """Target-domain pairs per class of the in-domain pool: geometric from ``indomain_head`` to ``indomain_tail``."""
    ratio = (cfg.indomain_tail / cfg.indomain_head) ** (1.0 / (classes - 1))
    return np.array([round(cfg.indomain_head * ratio**r) for r in range(classes)], dtype=np.int64)


INDOMAIN_SEED = 20261203
"""Fixes the in-domain pool (class order, which captions are replaced): the pool is the same for every seed."""


def indomain_pool(cfg: Config) -> tuple[Dataset, dict]:
    """The in-domain scenario's CPT pool (a dataset of raw pairs) and a description of how it was made."""
    from lightning_chips.datasets.real import AnimalMNISTPairs, OpenClipartPairs

    size = cfg.image_size
    animal = AnimalMNISTPairs("train", image_size=size)
    other_class = AnimalMNISTPairs("train", image_size=size, noise_fraction=1.0, seed=1)  # every caption mismatched
    rng = np.random.default_rng(INDOMAIN_SEED)
    order = rng.permutation(len(animal.classnames))  # order[0] is the head class
    counts = class_counts(cfg, len(order))
    positions = np.concatenate([np.flatnonzero(animal.labels == c)[:n] for c, n in zip(order, counts, strict=True)])
    positions = np.sort(positions)
    n = len(positions)
    kinds = np.zeros(n, dtype=np.int64)  # 0 clean, 1 mismatched, 2 uninformative
    shuffled = rng.permutation(n)
    n_mis, n_uninf = round(cfg.indomain_mismatched * n), round(cfg.indomain_uninformative * n)
    kinds[shuffled[:n_mis]] = 1
    kinds[shuffled[n_mis : n_mis + n_uninf]] = 2
    titles = OpenClipartPairs("val", image_size=size).captions  # clip-art titles unrelated to the animals
    captions = []
    for pos, kind in zip(positions.tolist(), kinds.tolist(), strict=True):
        if kind == 0:
            captions.append(animal.captions[pos])
        elif kind == 1:
            captions.append(other_class.captions[pos])
        elif rng.random() < 0.5:
            captions.append(GENERIC_CAPTIONS[int(rng.integers(len(GENERIC_CAPTIONS)))])
        else:
            captions.append(titles[int(rng.integers(len(titles)))])
    target_part = Recaptioned(animal.subset(positions), captions, kinds == 1, kinds == 2)
    description = {
        "class_order": [animal.classnames[c] for c in order],
        "class_counts": counts.tolist(),
        "head_classes": [int(c) for c in order[:3]],
    }
    return target_part, description


SHARED_SETS = ("general", "test_animal", "test_fashion", "test_clipart", "prompts")
"""The feature sets every scenario shares (the pretraining pool, the test sets, the class prompts): cached once."""
SHARED_FIELDS = ("image_size", "general_clipart", "general_fashion", "test_animal", "test_fashion", "test_clipart")
"""The :class:`Config` fields the shared sets depend on."""


def _cache_file(cfg: Config, cache: Path, scenario: str) -> Path:
    """The cache file of a scenario's features (``scenario="shared"``: :data:`SHARED_SETS`): keyed by the config
    (its :data:`SHARED_FIELDS` for the shared sets), the data code and the code that builds them."""
    code = b"".join((ROOT / "lightning_chips" / f).read_bytes() for f in ("datasets/real.py", "models/two_tower.py"))
    builders = (build_sets, _shared_sets, indomain_pool, class_counts, Recaptioned, Towers, _collate_raw)
    code += "".join(inspect.getsource(f) for f in builders).encode() + repr((GENERIC_CAPTIONS, INDOMAIN_SEED)).encode()
    config = {k: getattr(cfg, k) for k in SHARED_FIELDS} if scenario == "shared" else asdict(cfg)
    key = hashlib.sha1(json.dumps([config, scenario], sort_keys=True, default=str).encode() + code)
    return cache / f"features-{scenario}-{key.hexdigest()[:10]}.pt"


def _save(sets: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(sets, tmp)
    os.replace(tmp, path)


def _shared_sets(cfg: Config, encoder: Towers, cache: Path) -> dict:
    """:data:`SHARED_SETS`, from their cache file when it exists."""
    from lightning_chips.datasets.real import AnimalMNISTPairs, FashionMNISTPairs, OpenClipartPairs

    path = _cache_file(cfg, cache, "shared")
    if path.exists():
        return torch.load(path, weights_only=False)
    size = cfg.image_size
    clipart, fashion = OpenClipartPairs("train", image_size=size), FashionMNISTPairs("train", image_size=size)
    sets: dict = {"general": Features.cat([
        encoder.encode(_take(clipart, cfg.general_clipart), "general openclipart"),
        encoder.encode(_take(fashion, cfg.general_fashion), "general fashion"),
    ])}  # fmt: skip
    animal_test, fashion_test = AnimalMNISTPairs("test", image_size=size), FashionMNISTPairs("test", image_size=size)
    clipart_test = OpenClipartPairs("test", image_size=size)
    sets["test_animal"] = encoder.encode(_take(animal_test, min(cfg.test_animal, len(animal_test))), "test animal")
    sets["test_fashion"] = encoder.encode(_take(fashion_test, min(cfg.test_fashion, len(fashion_test))),
                                          "test fashion")  # fmt: skip
    sets["test_clipart"] = encoder.encode(_take(clipart_test, min(cfg.test_clipart, len(clipart_test))),
                                          "test openclipart")  # fmt: skip
    prompts = {}
    for name, data in (("animal", animal_test), ("fashion", fashion_test)):
        classnames, templates = list(data.classnames), list(data.templates)
        texts = [t.format(c) for c in classnames for t in templates]
        prompts[name] = encoder.texts(texts).reshape(len(classnames), len(templates), -1)
    prompts["all_classnames"] = sorted({*animal_test.classnames, *fashion_test.classnames, *clipart.classnames})
    prompts["all_classnames_features"] = encoder.texts([f"a photo of a {c}." for c in prompts["all_classnames"]])
    sets["prompts"] = prompts
    _save(sets, path)
    return sets


def build_sets(cfg: Config, towers: Towers | None, cache: Path, scenario: str = "standard") -> dict:
    """Every feature set of a scenario's protocol, from the cache when it holds them.

    Keys: ``general`` (the pretraining pool), ``pool`` (the CPT pool), ``target``, ``test_animal``,
    ``test_fashion``, ``test_clipart``, ``prompts`` (zero-shot class prompts) and ``info`` (head classes, ...).
    """
    from lightning_chips.datasets.real import AnimalMNISTPairs, FashionMNISTPairs, OpenClipartPairs

    if scenario not in SCENARIOS:
        raise ValueError(f"Unknown scenario {scenario!r}; use one of {SCENARIOS}.")
    path = _cache_file(cfg, cache, scenario)
    if path.exists():
        return torch.load(path, weights_only=False)
    towers = towers or Towers(cfg.image_size)
    sets: dict = {"info": {}, **_shared_sets(cfg, towers, cache)}
    size = cfg.image_size
    clipart_noisy = OpenClipartPairs("train", image_size=size, noise_fraction=cfg.noise_fraction, seed=1)
    fashion_noisy = FashionMNISTPairs("train", image_size=size, noise_fraction=cfg.noise_fraction, seed=1)
    animal_val = AnimalMNISTPairs("val", image_size=size)
    if scenario in ("standard", "clean"):
        noise = cfg.noise_fraction if scenario == "standard" else 0.0
        clipart_noisy = OpenClipartPairs("train", image_size=size, noise_fraction=noise, seed=1)
        fashion_noisy = FashionMNISTPairs("train", image_size=size, noise_fraction=noise, seed=1)
        animal_noisy = AnimalMNISTPairs("train", image_size=size, noise_fraction=noise, seed=1)
        sets["pool"] = Features.cat([
            towers.encode(_take(animal_noisy, cfg.pool_animal), "pool animal"),
            towers.encode(_take(clipart_noisy, cfg.pool_clipart, cfg.general_clipart), "pool openclipart"),
            towers.encode(_take(fashion_noisy, cfg.pool_fashion, cfg.general_fashion), "pool fashion"),
        ])  # fmt: skip
        sets["target"] = towers.encode(_take(animal_val, cfg.target_pairs), "target")
    else:
        target_part, sets["info"] = indomain_pool(cfg)
        sets["pool"] = Features.cat([
            towers.encode(target_part, "pool animal"),
            towers.encode(_take(clipart_noisy, cfg.indomain_general, cfg.general_clipart), "pool openclipart"),
            towers.encode(_take(fashion_noisy, cfg.indomain_general, cfg.general_fashion), "pool fashion"),
        ])  # fmt: skip
        per_class = cfg.target_pairs // len(animal_val.classnames)  # a uniform target set
        uniform = np.sort(np.concatenate([np.flatnonzero(animal_val.labels == c)[:per_class]
                                          for c in range(len(animal_val.classnames))]))  # fmt: skip
        sets["target"] = towers.encode(animal_val.subset(uniform), "target")
    if "head_classes" not in sets["info"]:  # the most frequent target-domain classes of the pool
        target_labels = sets["pool"].labels[sets["pool"].domain == TARGET_DOMAIN]
        sets["info"]["head_classes"] = torch.bincount(target_labels, minlength=10).argsort(descending=True)[:3].tolist()
    _save(sets, path)
    return sets


# ----------------------------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------------------------
def _model(cfg: Config, lr: float, state: dict | None = None, loss: str = "infonce") -> TwoTowerCLIP:
    model = TwoTowerCLIP(image_tower=None, text_tower=None, image_dim=1280, text_dim=384, embed_dim=cfg.embed_dim,
                         lr=lr, weight_decay=0.0, seed=0, loss=loss)  # fmt: skip
    if state is not None:
        model.load_state_dict(state)
    return model


def _trainer(epochs: int, callbacks: list | None = None) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks or [],
                      num_sanity_val_steps=0)  # fmt: skip


def train(cfg: Config, features: Features, *, epochs: int, lr: float, seed: int, state: dict | None,
          loss: str = "infonce") -> TwoTowerCLIP:  # fmt: skip
    pl.seed_everything(seed, verbose=False)
    model = _model(cfg, lr, state, loss)
    loader = DataLoader(FeatureDataset(features), batch_size=cfg.batch_size, shuffle=True, drop_last=False,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    _trainer(epochs).fit(model, loader)
    return model


@torch.no_grad()
def evaluate(model: TwoTowerCLIP, sets: dict) -> dict[str, float]:
    ep = model.endpoint()
    out = {}
    for name, key in (("target_acc1", "animal"), ("general_acc1", "fashion")):
        prompts = sets["prompts"][key]  # [C, T, d_t]
        z = F.normalize(F.normalize(prompts @ ep.text_proj, dim=-1).mean(1), dim=-1)
        metric = ZeroShotAccuracy(z.T, top_k=(1,))
        test = sets[f"test_{key}"]
        metric.update(ep.embed_image(test.image), test.labels)
        out[name] = float(metric.compute()["acc1"])
    test = sets["test_clipart"]
    recall = RetrievalRecallAtK(k=(1, 5))
    recall.update(ep.embed_image(test.image), test.ids, ep.embed_text(test.text), test.ids)
    r = recall.compute()
    for k in (1, 5):
        out[f"retrieval_r@{k}"] = 0.5 * float(r[f"image_retrieval_recall@{k}"] + r[f"text_retrieval_recall@{k}"])
    return out


def composition(sets: dict, positions: np.ndarray) -> dict[str, float]:
    """What a selection holds: target-domain, mismatched and uninformative shares; head-class share and normalised
    class entropy of its target-domain part (by image class)."""
    chosen = sets["pool"].index(torch.as_tensor(positions))
    in_target = chosen.domain == TARGET_DOMAIN
    labels = chosen.labels[in_target]
    counts = torch.bincount(labels, minlength=10).double()
    p = counts / counts.sum().clamp(min=1.0)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(len(counts)))
    head = torch.as_tensor(sets["info"]["head_classes"])
    return {
        "target_share": float(in_target.double().mean()),
        "mismatched_share": float(chosen.noisy.double().mean()),
        "uninformative_share": float(chosen.uninformative.double().mean()),
        "head_share": float(torch.isin(labels, head).double().mean()) if len(labels) else 0.0,
        "class_entropy": entropy,
    }


# ----------------------------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------------------------
def chips_kwargs(name: str) -> dict:
    """CHIPS keyword arguments of a method or ablation name (``chips``, ``chips+plausibility``, ``base:k=v,...``)."""
    base, _, spec = name.removesuffix("-reselect").removesuffix(SIGLIP).partition(":")
    presets = {"chips": PAPER, "chips+plausibility": FIXED, "chips+adaptive": ADAPTIVE}
    if base not in presets:
        raise ValueError(f"{name!r} is not a CHIPS variant.")
    kwargs: dict = dict(presets[base])
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key == "components":
            kwargs[key] = tuple(value.split("*"))
        elif key in ("solver", "sketch_layout") or value == "auto":
            kwargs[key] = value
        elif key in ("curvature_samples", "reference_steps", "sketch_dim", "bank_size", "negatives_per_sample"):
            kwargs[key] = int(value)
        else:
            kwargs[key] = float(value)
    return kwargs


def _is_chips_variant(name: str) -> bool:
    try:
        return ":" in name and bool(chips_kwargs(name))
    except ValueError:
        return False


def make_scorer(name: str, budget: float, seed: int, sets: dict) -> Scorer:
    from lightning_chips.scoring import CHIPS, Chain, NegCLIPLoss, NormSim

    classnames = list(sets["prompts"]["all_classnames"])
    name = name.removesuffix(SIGLIP)  # the same method; the model (and so the loss) differs
    if name == "random":
        return build_scorer("random", seed=seed)
    if name == "negclip":
        return NegCLIPLoss(batch_size=1024, seed=seed)
    if name == "negclip+normsim":  # Wang et al.: negCLIPLoss keeps 1.5 x the budget, NormSim_inf ranks them
        return Chain(NegCLIPLoss(batch_size=1024, seed=seed), NormSim(), keep_fraction=min(1.0, 1.5 * budget))
    if name == "clipcov":
        return build_scorer("clipcov", classes="kmeans", num_clusters=20, seed=seed)
    if name == "clip_powered":
        return build_scorer("clip_powered", classnames=classnames, labels="zeroshot", seed=seed)
    if name.startswith("chips"):
        return CHIPS(seed=seed, **chips_kwargs(name))
    return build_scorer(name)


BUDGET_DEPENDENT = ("negclip+normsim",)
"""Methods whose scores depend on the budget; every other method is scored once per seed for all budgets."""


class _PromptFeatures:
    """The scorers' ``text_encoder`` for cached features: class prompts -> normalised embeddings."""

    def __init__(self, model: TwoTowerCLIP, sets: dict) -> None:
        names = list(sets["prompts"]["all_classnames"])
        self.lookup = {f"a photo of a {c}.": i for i, c in enumerate(names)}
        self.features = sets["prompts"]["all_classnames_features"]
        self.model = model

    def __call__(self, prompts: list[str]) -> Tensor:
        rows = []
        for p in prompts:
            if p not in self.lookup:
                raise KeyError(f"No cached feature for the prompt {p!r}.")
            rows.append(self.lookup[p])
        return self.model.endpoint().embed_text(self.features[rows]).detach()


def pool_scores(name: str, budget: float, seed: int, model: TwoTowerCLIP, sets: dict) -> np.ndarray:
    """Scores of every pool pair by method ``name`` with the pretrained model; what the scorer estimated on the way
    (:meth:`Scorer.round_metrics`, e.g. the noise share) goes to :data:`ESTIMATES`."""
    pool: Features = sets["pool"]
    scorer = make_scorer(name, budget, seed, sets)
    context = RoundContext(text_encoder=_PromptFeatures(model, sets), seed=seed)
    with torch.enable_grad():
        scorer.prepare(model.endpoint(), sets["target"].pairs(), pool.pairs(), context)
    estimates = scorer.round_metrics()  # "target_share" is also a composition column: kept apart as "estimated_"
    ESTIMATES[(name, seed)] = {("estimated_" + k if k == "target_share" else k): v for k, v in estimates.items()}
    with torch.no_grad():
        return torch.cat([scorer.score(b) for b in pool.pairs().batches(2048)]).double().numpy()


ESTIMATES: dict[tuple[str, int], dict[str, float]] = {}
"""The round metrics of the last :func:`pool_scores` of each (method, seed)."""


def choose(name: str, budget: float, seed: int, model: TwoTowerCLIP, sets: dict,
           cache: dict | None = None) -> np.ndarray:  # fmt: skip
    """Pool positions of the subset ``name`` selects with the pretrained model (scores reused from ``cache``)."""
    pool: Features = sets["pool"]
    key = (name, seed, budget if name in BUDGET_DEPENDENT else None)
    if cache is not None and key in cache:
        scores = cache[key]
    else:
        scores = pool_scores(name, budget, seed, model, sets)
        if cache is not None:
            cache[key] = scores
    chosen = select(pool.ids.numpy(), scores, fraction=budget, method=name)
    position = {int(u): i for i, u in enumerate(pool.ids.tolist())}
    return np.array(sorted(position[int(u)] for u in chosen.ids))


def cpt(cfg: Config, sets: dict, state: dict, positions: np.ndarray | None, seed: int,
        loss: str = "infonce") -> dict[str, float]:  # fmt: skip
    pool: Features = sets["pool"]
    subset = pool if positions is None else pool.index(torch.as_tensor(positions))
    model = train(cfg, subset, epochs=cfg.cpt_epochs, lr=cfg.cpt_lr, seed=seed, state=state, loss=loss)
    return evaluate(model, sets)


def cpt_reselect(
    cfg: Config, sets: dict, state: dict, name: str, budget: float, seed: int
) -> tuple[dict, list, np.ndarray]:
    """CHIPS re-selected every epoch (= round) by DataSelectionCallback, same steps as one selection + fixed epochs.

    Returns the metrics, the overlaps of consecutive rounds and the pool positions of the last round's selection.
    """
    pl.seed_everything(seed, verbose=False)
    pool: Features = sets["pool"]
    model = _model(cfg, cfg.cpt_lr, state)
    steps = math.ceil(budget * len(pool) / cfg.batch_size)
    data = ScoredSubsetDataModule(FeatureDataset(pool), FeatureDataset(sets["target"]), batch_size=cfg.batch_size,
                                  steps_per_round=steps, seed=seed, normalize="none",
                                  eval_batch_size=2048)  # fmt: skip
    callback = DataSelectionCallback(make_scorer(name, budget, seed, sets), fraction=budget, every_n_epochs=1,
                                     save_dir="", log=False, progress=False)  # fmt: skip
    _trainer(cfg.cpt_epochs, [callback]).fit(model, datamodule=data)
    overlaps = [h["overlap"] for h in callback.history[1:]]
    return evaluate(model, sets), overlaps, np.sort(np.asarray(callback.selection.indices))


# ----------------------------------------------------------------------------------------------------------------
# end-point fidelity
# ----------------------------------------------------------------------------------------------------------------
def fidelity(cfg: Config, state: dict) -> dict[str, float]:
    """Spearman between end-point alignment and alignment with the last tower blocks trainable (paper: 0.83)."""
    from scipy.stats import spearmanr

    from lightning_chips.datasets.real import AnimalMNISTPairs, FashionMNISTPairs, OpenClipartPairs
    from lightning_chips.functional import endpoint_parameter_names, full_parameter_influence

    size = cfg.image_size
    model = TwoTowerCLIP(embed_dim=cfg.embed_dim, image_size=size, trainable_blocks=1).double().eval()
    heads = {k: v for k, v in state.items() if k in ("image_proj", "text_proj", "logit_scale")}
    model.load_state_dict(heads, strict=False)
    tokenizer = model.get_tokenizer()
    per = cfg.fidelity_pairs // 3
    pool = [
        *_take(AnimalMNISTPairs("train", image_size=size), per),
        *_take(OpenClipartPairs("train", image_size=size), per, cfg.general_clipart),
        *_take(FashionMNISTPairs("train", image_size=size), per, cfg.general_fashion),
    ]
    target = list(_take(AnimalMNISTPairs("val", image_size=size), cfg.fidelity_targets))
    batch, tbatch = _collate_raw(pool), _collate_raw(target)
    args = (batch["image"].double(), tokenizer(batch["text"]), tbatch["image"].double(), tokenizer(tbatch["text"]))
    common = dict(method="dot", pool_ids=batch["id"], bank_size=len(pool), chunk_size=8)
    start = time.perf_counter()
    endpoint = full_parameter_influence(model, *args, params=endpoint_parameter_names(model), **common)
    t_end = time.perf_counter() - start
    start = time.perf_counter()
    full = full_parameter_influence(model, *args, params=None, **common)
    t_full = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "spearman": float(spearmanr(endpoint.numpy(), full.numpy()).statistic),
        "pairs": len(pool),
        "targets": len(target),
        "endpoint_params": sum(model.get_parameter(n).numel() for n in endpoint_parameter_names(model)),
        "trainable_params": trainable,
        "seconds_endpoint": t_end,
        "seconds_full": t_full,
    }


# ----------------------------------------------------------------------------------------------------------------
# the run and the report
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Results:
    rows: dict[str, dict[str, list[dict[str, float]]]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def add(self, method: str, budget: str, metrics: dict[str, float]) -> None:
        self.rows.setdefault(method, {}).setdefault(budget, []).append(metrics)


COLUMNS = [("target_acc1", "target acc1"), ("general_acc1", "general acc1"), ("retrieval_r@1", "retrieval R@1"),
           ("retrieval_r@5", "retrieval R@5")]  # fmt: skip
COMPOSITION = [("target_share", "target"), ("mismatched_share", "mismatched"), ("uninformative_share", "uninformative"),
               ("head_share", "head classes"), ("class_entropy", "class entropy")]  # fmt: skip


def _fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def _budget_order(by_budget: dict, budgets: list[str]) -> list[str]:
    return [b for b in ["-", *budgets, "100%", "50%"] if b in by_budget]


def table(results: Results, budgets: list[str]) -> str:
    lines = ["| method | budget | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]  # fmt: skip
    for method, by_budget in results.rows.items():
        for budget in _budget_order(by_budget, budgets):
            runs = by_budget[budget]
            cells = [_fmt([r[key] for r in runs]) for key, _ in COLUMNS]
            lines.append(f"| {method} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def composition_table(results: Results, budgets: list[str]) -> str:
    """What each selection holds (shares in %, entropy in [0, 1]), mean over seeds; the pool's own first."""
    lines = ["| method | budget | " + " | ".join(title for _, title in COMPOSITION) + " |",
             "|---|---|" + "---|" * len(COMPOSITION)]  # fmt: skip

    def cells(values: dict[str, list[float]]) -> str:
        return " | ".join(f"{statistics.mean(values[k]):.2f}" if k == "class_entropy" else
                          f"{100 * statistics.mean(values[k]):.0f}%" for k, _ in COMPOSITION)  # fmt: skip

    pool = results.extra.get("pool_composition")
    if pool:
        lines.append("| (whole pool) | 100% | " + cells({k: [v] for k, v in pool.items()}) + " |")
    for method, by_budget in results.rows.items():
        for budget in _budget_order(by_budget, budgets):
            runs = [r for r in by_budget[budget] if "target_share" in r]
            if runs:
                lines.append(f"| {method} | {budget} | " + cells({k: [r[k] for r in runs] for k, _ in COMPOSITION})
                             + " |")  # fmt: skip
    return "\n".join(lines)


def render(results: Results, budgets: list[str], scenario: str) -> str:
    """The markdown of one scenario: the accuracy table, then the composition of each selection."""
    parts = [f"## Scenario: {scenario}", "", results.extra.get("description", ""), "",
             "Accuracy in %, mean ± std over the seeds:", "", table(results, budgets), "",
             "What each selection holds (mean over the seeds; head classes and class entropy are of its target-domain "
             "pairs, by image class; the -reselect rows show the last round's selection):", "",
             composition_table(results, budgets)]  # fmt: skip
    estimated = {m: [r["noise_share"] for runs in by_budget.values() for r in runs]
                 for m, by_budget in results.rows.items() if any("noise_share" in r for rs in by_budget.values()
                                                                for r in rs)}  # fmt: skip
    pool = results.extra.get("pool_composition")
    if estimated and pool:
        true = 100 * (pool["mismatched_share"] + pool["uninformative_share"])
        parts += ["", "Noise share the adaptive plausibility weight estimated (mean ± std over seeds; the pool holds "
                  f"{true:.1f} % mismatched or uninformative captions): " + "; ".join(
                      f"{m} {100 * statistics.mean(v):.1f} ± {100 * statistics.pstdev(v):.1f} %"
                      for m, v in estimated.items())]  # fmt: skip
    shares = {m: [r["estimated_target_share"] for runs in by_budget.values() for r in runs]
              for m, by_budget in results.rows.items() if any("estimated_target_share" in r
                                                             for rs in by_budget.values() for r in rs)}  # fmt: skip
    if shares and pool:
        parts += ["", "Target-domain share `alpha=\"auto\"` estimated (mean ± std over seeds; the pool holds "
                  f"{100 * pool['target_share']:.1f} % target-domain pairs): " + "; ".join(
                      f"{m} {100 * statistics.mean(v):.1f} ± {100 * statistics.pstdev(v):.1f} %"
                      for m, v in shares.items())]  # fmt: skip
    siglip = results.extra.get("pretrained_siglip")
    if siglip:
        parts += ["", "The `-siglip` rows start from a model pretrained like the others but with SigLIP's sigmoid "
                  f"loss (target acc1 {100 * siglip['target_acc1']:.1f}, general acc1 "
                  f"{100 * siglip['general_acc1']:.1f} before CPT) and continue with that loss."]  # fmt: skip
    fid = results.extra.get("fidelity")
    if fid:
        parts += ["", f"End-point fidelity: Spearman {fid['spearman']:.3f} between end-point alignment "
                  f"({fid['endpoint_params']:,} parameters) and alignment with the last tower blocks trainable "
                  f"({fid['trainable_params']:,} parameters), {fid['pairs']} pool pairs x {fid['targets']} target "
                  f"pairs."]  # fmt: skip
    return "\n".join(parts)


def plot(results: Results, budgets: list[str], path: Path, scenario: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    xs = [float(b.rstrip("%")) for b in budgets]
    panels = [*COLUMNS[:2], ("mismatched_share", "mismatched + uninformative captions")]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for method, by_budget in results.rows.items():
            if ":" in method or not all(b in by_budget for b in budgets):
                continue
            if key == "mismatched_share":
                if "target_share" not in by_budget[budgets[0]][0]:
                    continue
                means = [100 * statistics.mean(r["mismatched_share"] + r["uninformative_share"] for r in by_budget[b])
                         for b in budgets]  # fmt: skip
            else:
                means = [100 * statistics.mean(r[key] for r in by_budget[b]) for b in budgets]
            style = "-o" if method.startswith("chips") else "--."
            ax.plot(xs, means, style, label=method, linewidth=2.2 if method.startswith("chips") else 1)
        for ref, color in (("full pool", "black"), ("random 50%", "grey")):
            runs = results.rows.get(ref, {}).get("100%" if ref == "full pool" else "50%")
            if runs and key in runs[0]:
                ax.axhline(100 * statistics.mean(r[key] for r in runs), color=color, linestyle=":", label=ref)
        ax.set_xlabel("budget (% of the CPT pool)")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(f"{scenario}: {title}")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


DESCRIPTIONS = {
    "standard": "A general-domain pool with a target-domain minority: {pool} pairs, {target:.0f} % Animal-MNIST, "
                "{mismatched:.0f} % mismatched captions in every part. Target set: {targets} Animal-MNIST validation "
                "pairs.",
    "clean": "The standard pool without caption noise: {pool} pairs, {target:.0f} % Animal-MNIST, {mismatched:.0f} % "
             "mismatched captions. Target set: {targets} Animal-MNIST validation pairs.",
    "indomain": "A mostly target-domain pool: {pool} pairs, {target:.0f} % Animal-MNIST with a long tail of classes "
                "({counts} pairs per class, head classes {head}), {mismatched:.0f} % mismatched and "
                "{uninformative:.0f} % uninformative captions, and a general-domain minority. Target set: {targets} "
                "Animal-MNIST validation pairs, uniform over classes; the test set is uniform too.",
    "indomain-clean": "The in-domain pool without caption noise: {pool} pairs, {target:.0f} % Animal-MNIST, "
                      "{mismatched:.0f} % mismatched and {uninformative:.0f} % uninformative captions. Target set: "
                      "{targets} Animal-MNIST validation pairs, uniform over classes.",
    "indomain-noisy": "The in-domain pool with most captions noisy: {pool} pairs, {target:.0f} % Animal-MNIST, "
                      "{mismatched:.0f} % mismatched and {uninformative:.0f} % uninformative captions (45 % and 15 % "
                      "of its target-domain part, 45 % mismatched in its general minority). Target set: {targets} "
                      "Animal-MNIST validation pairs, uniform over classes.",
}  # fmt: skip


def scenario_methods(cfg: Config, scenario: str, only: list[str] | None = None) -> list[str]:
    """The selection methods a scenario runs: every method (no re-selection rows on the clean pool, where there is
    nothing to filter), the ablations when ``cfg`` asks, only :data:`VARIANT_METHODS` on a noise variant; of them,
    those in ``only``, and any CHIPS variant ``only`` names (``chips:alpha=0``, :func:`chips_kwargs`) on any
    scenario."""
    methods = [m for m in METHODS if cfg.reselect and scenario != "clean" or not m.endswith("-reselect")]
    methods += ABLATIONS if cfg.ablations and scenario != "clean" else []
    methods = VARIANT_METHODS if scenario in VARIANTS else methods
    if only is None:
        return methods
    return [m for m in methods if m in only] + [m for m in only if ":" in m and m not in methods]


def run(cfg: Config, cache: Path, scenario: str, log: Callable[[str], None] = print,
        only: list[str] | None = None) -> Results:  # fmt: skip
    start = time.perf_counter()
    base, changes = VARIANTS.get(scenario, (scenario, {}))
    cfg = replace(cfg, **changes)
    sets = build_sets(cfg, None, cache, base)
    pool: Features = sets["pool"]
    log(f"[{scenario}] features ready in {time.perf_counter() - start:.0f}s: general {len(sets['general'])}, pool "
        f"{len(pool)} ({int((pool.domain == TARGET_DOMAIN).sum())} target-domain, {int(pool.noisy.sum())} "
        f"mismatched, {int(pool.uninformative.sum())} uninformative), target {len(sets['target'])}")  # fmt: skip
    pretrained = train(cfg, sets["general"], epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, seed=0, state=None)
    state = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
    results = Results()
    pool_comp = composition(sets, np.arange(len(pool)))
    classes = sets["prompts"]["all_classnames"]
    results.extra["pool_composition"] = pool_comp
    results.extra["pool_size"] = len(pool)
    results.extra["info"] = sets["info"]
    results.extra["description"] = DESCRIPTIONS[scenario].format(
        pool=len(pool), target=100 * pool_comp["target_share"], mismatched=100 * pool_comp["mismatched_share"],
        uninformative=100 * pool_comp["uninformative_share"], targets=len(sets["target"]),
        counts=" / ".join(str(c) for c in sets["info"].get("class_counts", [])),
        head=", ".join(sets["info"].get("class_order", classes)[:3]),
    )  # fmt: skip
    results.add("pretrained (no CPT)", "-", evaluate(pretrained, sets))
    budgets = [f"{round(100 * b)}%" for b in cfg.budgets]
    scores: dict = {}
    for seed in cfg.seeds if only is None else ():
        results.add("full pool", "100%", cpt(cfg, sets, state, None, seed))
        results.add("random 50%", "50%", cpt(cfg, sets, state, choose("random", 0.5, seed, pretrained, sets), seed))
    methods = scenario_methods(cfg, scenario, only)
    sigmoid: tuple[TwoTowerCLIP, dict] | None = None  # the SigLIP-loss model, pretrained like the InfoNCE one
    for method in methods:
        t0 = time.perf_counter()
        for budget, label in zip(cfg.budgets, budgets, strict=True):
            for seed in cfg.seeds:
                if method.endswith("-reselect"):
                    metrics, overlaps, positions = cpt_reselect(cfg, sets, state, method, budget, seed)
                    results.extra.setdefault("reselect_overlap", {})[f"{method} {label}/{seed}"] = overlaps
                elif method.endswith(SIGLIP):
                    if sigmoid is None:
                        model = train(cfg, sets["general"], epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, seed=0,
                                      state=None, loss="sigmoid")  # fmt: skip
                        sigmoid = model, {k: v.detach().clone() for k, v in model.state_dict().items()}
                        results.extra["pretrained_siglip"] = evaluate(model, sets)
                    positions = choose(method, budget, seed, sigmoid[0], sets, scores)
                    metrics = cpt(cfg, sets, sigmoid[1], positions, seed, loss="sigmoid")
                else:
                    positions = choose(method, budget, seed, pretrained, sets, scores)
                    metrics = cpt(cfg, sets, state, positions, seed)
                metrics.update(composition(sets, positions), selected=len(positions))
                metrics.update(ESTIMATES.get((method, seed), {}) if not method.endswith("-reselect") else {})
                results.add(method, label, metrics)
        log(f"[{scenario}] {method}: {time.perf_counter() - t0:.0f}s")
    if cfg.fidelity_pairs and scenario == "standard":
        t0 = time.perf_counter()
        results.extra["fidelity"] = fidelity(cfg, state)
        log(f"fidelity: {results.extra['fidelity']} ({time.perf_counter() - t0:.0f}s)")
    results.extra["seconds"] = time.perf_counter() - start
    return results


def render_all(results: dict[str, Results], budgets: list[str]) -> str:
    return "\n\n".join(render(r, budgets, name) for name, r in results.items())


def write(out: Path, cfg: Config, results: dict[str, Results], command: str) -> None:
    """table.md, results.json and one plot per scenario under ``out`` (each written to a temp name, then renamed)."""
    budgets = [f"{round(100 * b)}%" for b in cfg.budgets]
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": asdict(cfg),
        "scenarios": {name: {"rows": r.rows, "extra": r.extra} for name, r in results.items()},
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
    }
    for name, text in (("table.md", render_all(results, budgets) + "\n"),
                       ("results.json", json.dumps(payload, indent=1, default=str) + "\n")):  # fmt: skip
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    if len(budgets) > 1:
        for name, r in results.items():
            plot(r, budgets, out / f"plot-{name}.png", name)


def load(path: Path) -> tuple[Config, dict[str, Results], dict]:
    """A results.json written by :func:`write`: the config, the results per scenario and the payload."""
    payload = json.loads(path.read_text())
    config = payload["config"]
    cfg = Config(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in Config.__annotations__}
    )
    results = {name: Results(r["rows"], r["extra"]) for name, r in payload["scenarios"].items()}
    return cfg, results, payload


def main(argv: list[str] | None = None) -> dict[str, Results]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, one budget, small pools, no ablations")
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], nargs="+", default=["all"],
                        help="which pool designs to run")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache", help="feature cache directory")
    parser.add_argument("--out", type=Path, default=None, help="directory for table.md, results.json, plot-*.png")
    parser.add_argument("--render", type=Path, default=None, help="re-render table.md and plots from results.json")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="merge the results.json of runs of "
                        "single scenarios (run side by side, e.g. one per core) into --out")  # fmt: skip
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (the heads and features are small: one thread is fastest, and robust to a busy machine)",
    )
    parser.add_argument("--methods", nargs="+", default=None, help="run only these methods (and the pretrained row), "
                        "e.g. to add rows to an earlier run with --update")  # fmt: skip
    parser.add_argument("--update", type=Path, default=None, help="a results.json whose rows the methods run here "
                        "replace or join (same configuration); written to --out")  # fmt: skip
    args = parser.parse_args(argv)
    if args.update is not None and (args.out is None or args.methods is None):
        parser.error("--update needs --methods (the rows to run) and --out")
    if args.merge:
        if args.out is None:
            parser.error("--merge needs --out (the directory of the merged table.md, results.json and plots)")
        loaded = [load(path) for path in args.merge]
        if any(asdict(cfg) != asdict(loaded[0][0]) for cfg, _, _ in loaded):
            parser.error("--merge: the runs used different configurations")
        results = {name: r for _, res, _ in loaded for name, r in res.items()}
        results = {name: results[name] for name in SCENARIOS if name in results}
        command = "; ".join(p["command"] for _, _, p in loaded)
        command += f"; python benchmarks/selection_quality.py --merge {' '.join(map(str, args.merge))} --out {args.out}"
        write(args.out, loaded[0][0], results, command)
        print(render_all(results, [f"{round(100 * b)}%" for b in loaded[0][0].budgets]))
        return results
    if args.render is not None:
        cfg, results, payload = load(args.render)
        write(args.render.parent, cfg, results, payload["command"])
        text = render_all(results, [f"{round(100 * b)}%" for b in cfg.budgets])
        print(text)
        return results
    cfg = QUICK if args.quick else Config()
    torch.set_num_threads(args.threads)
    scenarios = SCENARIOS if "all" in args.scenario else tuple(dict.fromkeys(args.scenario))
    if args.methods is not None and (unknown := [m for m in args.methods if m not in METHODS + ABLATIONS
                                                 and not _is_chips_variant(m)]):  # fmt: skip
        parser.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    results = {name: run(cfg, args.cache, name, only=args.methods) for name in scenarios}
    command = "python benchmarks/selection_quality.py" + (" --quick" if args.quick else "")
    command += "" if "all" in args.scenario else f" --scenario {' '.join(scenarios)}"
    command += "" if args.methods is None else f" --methods {' '.join(args.methods)}"
    if args.update is not None:
        base_cfg, base, payload = load(args.update)
        if asdict(base_cfg) != asdict(cfg):
            parser.error(f"--update: {args.update} was run with another configuration")
        for name, new in results.items():
            old = base.setdefault(name, Results())
            for method, rows in new.rows.items():
                if method != "pretrained (no CPT)":
                    old.rows[method] = rows
            old.extra.update({k: v for k, v in new.extra.items() if k not in ("seconds",)})
        results, command = base, f"{payload['command']}; {command} --update {args.update}"
    print(render_all(results, [f"{round(100 * b)}%" for b in cfg.budgets]))
    if args.out is not None:
        write(args.out, cfg, results, command)
    return results


if __name__ == "__main__":
    main()
