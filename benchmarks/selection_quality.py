"""The CHIPS table in miniature, on real images and captions: method x budget -> target and general zero-shot.

Protocol (docs/benchmarks/quality.md has the details and the measured table):
  1. "Pretrained CLIP": TwoTowerCLIP (frozen EfficientNet-Lite0 + frozen MiniLM, trained linear heads and
     temperature) trained on a general pool: openclipart (train split) + Fashion-MNIST (train split).
  2. CPT pool: an Animal-MNIST slice (the target domain, a minority) + more openclipart and Fashion-MNIST, with a
     share of deliberately mismatched captions. Target set for selection: Animal-MNIST validation pairs. Test
     sets are disjoint from both.
  3. Every method selects a budget of the pool once, with the pretrained model (CHIPS-reselect re-selects every
     epoch through DataSelectionCallback); CPT then runs a fixed number of epochs over the subset from the same
     starting point, for each seed (the seed sets the data order and the seeded methods' randomness).
  4. Reported: target zero-shot acc1 (Animal-MNIST test), general zero-shot acc1 (Fashion-MNIST test), general
     retrieval recall@1/5 (held-out openclipart, mean of image->text and text->image), mean +- std over seeds.
  5. CHIPS ablations (alignment only, x learnability, full, alpha = 0, exact solve) and end-point fidelity
     (Spearman between end-point and full-parameter alignment with the last tower blocks trainable).

The towers are frozen, so their features are computed once and cached (benchmarks/.cache); CPT trains the heads
on the cached features, which is exactly the frozen-tower model.

    bash benchmarks/setup_data.sh                      # data and weights (once)
    python benchmarks/selection_quality.py --quick     # one seed, one budget, small pool (< 5 min)
    python benchmarks/selection_quality.py             # the full table, plot and doc (< 45 min on 2 cores)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
from lightning_chips.scoring import build_scorer  # noqa: E402
from lightning_chips.scoring.base import Scorer  # noqa: E402
from lightning_chips.selection import select  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Config:
    general_clipart: int = 3000
    general_fashion: int = 3000
    pool_clipart: int = 2500
    pool_fashion: int = 3000
    pool_animal: int = 800
    noise_fraction: float = 0.2
    target_pairs: int = 100
    test_animal: int = 2000
    test_fashion: int = 2000
    test_clipart: int = 800
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
    fidelity_pairs: int = 150
    fidelity_targets: int = 32


QUICK = Config(
    general_clipart=600,
    general_fashion=600,
    pool_clipart=500,
    pool_fashion=500,
    pool_animal=250,
    target_pairs=64,
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
           "tracin", "trak", "chips", "chips-reselect"]  # fmt: skip
ABLATIONS = ["chips:alignment", "chips:alignment*learnability", "chips:alpha=0", "chips:sketch@1024",
             "chips:exact@1024"]  # fmt: skip
"""CHIPS ablations. The exact (kernel) solve needs an R x R Gram matrix over R curvature atoms, so the sketch vs exact
comparison uses 1,024 curvature samples (R = 5,120) for both; the default CHIPS uses 8,192 samples."""
REFERENCES = ["full pool", "random 50%"]


# ----------------------------------------------------------------------------------------------------------------
# data and the feature cache
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Features:
    """Cached tower features of a set of pairs (and what the tables need about them)."""

    ids: Tensor
    image: Tensor
    text: Tensor
    labels: Tensor
    noisy: Tensor
    domain: Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, idx: Tensor) -> Features:
        return Features(*(getattr(self, f)[idx] for f in ("ids", "image", "text", "labels", "noisy", "domain")))

    def pairs(self) -> PairFeatures:
        return PairFeatures(self.ids, self.image, self.text, self.labels)

    @staticmethod
    def cat(parts: list[Features]) -> Features:
        return Features(*(torch.cat([getattr(p, f) for p in parts]) for f in
                          ("ids", "image", "text", "labels", "noisy", "domain")))  # fmt: skip


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
                                  batch["label"], batch["noisy"], batch["domain"]))  # fmt: skip
        return Features.cat(parts)


def _collate_raw(items: list[dict]) -> dict:
    return {
        "image": torch.stack([torch.as_tensor(x["image"]) for x in items]),
        "text": [x["text"] for x in items],
        "id": torch.as_tensor([int(x["id"]) for x in items], dtype=torch.int64),
        "label": torch.as_tensor([int(x.get("label", -1)) for x in items], dtype=torch.int64),
        "noisy": torch.as_tensor([bool(x.get("noisy", False)) for x in items]),
        "domain": torch.as_tensor([int(x.get("domain", -1)) for x in items], dtype=torch.int64),
    }


def _take(dataset: Dataset, count: int, offset: int = 0) -> Dataset:
    if offset + count > len(dataset):
        raise ValueError(f"{type(dataset).__name__} has {len(dataset)} pairs; the benchmark needs {offset + count}.")
    return torch.utils.data.Subset(dataset, range(offset, offset + count))


def build_sets(cfg: Config, towers: Towers, cache: Path) -> dict[str, Features | dict]:
    """Every feature set of the protocol, from the cache when it holds them."""
    from lightning_chips.data.real import AnimalMNISTPairs, FashionMNISTPairs, OpenClipartPairs

    size = cfg.image_size
    code = b"".join((ROOT / "lightning_chips" / f).read_bytes() for f in ("data/real.py", "models/two_tower.py"))
    key = hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True, default=str).encode() + code).hexdigest()[:10]
    path = cache / f"features-{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    clipart = OpenClipartPairs("train", image_size=size)
    clipart_noisy = OpenClipartPairs("train", image_size=size, noise_fraction=cfg.noise_fraction, seed=1)
    fashion = FashionMNISTPairs("train", image_size=size)
    fashion_noisy = FashionMNISTPairs("train", image_size=size, noise_fraction=cfg.noise_fraction, seed=1)
    animal_noisy = AnimalMNISTPairs("train", image_size=size, noise_fraction=cfg.noise_fraction, seed=1)
    sets: dict[str, Features | dict] = {}
    sets["general"] = Features.cat([
        towers.encode(_take(clipart, cfg.general_clipart), "general openclipart"),
        towers.encode(_take(fashion, cfg.general_fashion), "general fashion"),
    ])  # fmt: skip
    sets["pool"] = Features.cat([
        towers.encode(_take(animal_noisy, cfg.pool_animal), "pool animal"),
        towers.encode(_take(clipart_noisy, cfg.pool_clipart, cfg.general_clipart), "pool openclipart"),
        towers.encode(_take(fashion_noisy, cfg.pool_fashion, cfg.general_fashion), "pool fashion"),
    ])  # fmt: skip
    sets["target"] = towers.encode(_take(AnimalMNISTPairs("val", image_size=size), cfg.target_pairs), "target")
    animal_test, fashion_test = AnimalMNISTPairs("test", image_size=size), FashionMNISTPairs("test", image_size=size)
    clipart_test = OpenClipartPairs("test", image_size=size)
    sets["test_animal"] = towers.encode(_take(animal_test, min(cfg.test_animal, len(animal_test))), "test animal")
    sets["test_fashion"] = towers.encode(_take(fashion_test, min(cfg.test_fashion, len(fashion_test))),
                                         "test fashion")  # fmt: skip
    sets["test_clipart"] = towers.encode(_take(clipart_test, min(cfg.test_clipart, len(clipart_test))),
                                         "test openclipart")  # fmt: skip
    prompts = {}
    for name, data in (("animal", animal_test), ("fashion", fashion_test)):
        classnames, templates = list(data.classnames), list(data.templates)
        texts = [t.format(c) for c in classnames for t in templates]
        prompts[name] = towers.texts(texts).reshape(len(classnames), len(templates), -1)
    prompts["all_classnames"] = sorted({*animal_test.classnames, *fashion_test.classnames, *clipart.classnames})
    prompts["all_classnames_features"] = towers.texts([f"a photo of a {c}." for c in prompts["all_classnames"]])
    sets["prompts"] = prompts
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(sets, tmp)
    os.replace(tmp, path)
    return sets


# ----------------------------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------------------------
def _model(cfg: Config, lr: float, state: dict | None = None) -> TwoTowerCLIP:
    model = TwoTowerCLIP(image_tower=None, text_tower=None, image_dim=1280, text_dim=384, embed_dim=cfg.embed_dim,
                         lr=lr, weight_decay=0.0, seed=0)  # fmt: skip
    if state is not None:
        model.load_state_dict(state)
    return model


def _trainer(epochs: int, callbacks: list | None = None) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks or [],
                      num_sanity_val_steps=0)  # fmt: skip


def train(cfg: Config, features: Features, *, epochs: int, lr: float, seed: int, state: dict | None) -> TwoTowerCLIP:
    pl.seed_everything(seed, verbose=False)
    model = _model(cfg, lr, state)
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


# ----------------------------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------------------------
def make_scorer(name: str, budget: float, seed: int, sets: dict) -> Scorer:
    from lightning_chips.scoring import CHIPS, Chain, NegCLIPLoss, NormSim

    classnames = list(sets["prompts"]["all_classnames"])
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
    if name in ("chips", "chips-reselect"):
        return CHIPS(seed=seed)
    if name.startswith("chips:"):
        variant = name.split(":", 1)[1]
        if variant == "alignment":
            return CHIPS(components=("alignment",), seed=seed)
        if variant == "alignment*learnability":
            return CHIPS(components=("alignment", "learnability"), seed=seed)
        if variant == "alpha=0":
            return CHIPS(alpha=0.0, seed=seed)
        if variant == "sketch@1024":
            return CHIPS(curvature_samples=1024, seed=seed)
        if variant == "exact@1024":
            return CHIPS(solver="kernel", curvature_samples=1024, seed=seed)
    return build_scorer(name)


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


def choose(name: str, budget: float, seed: int, model: TwoTowerCLIP, sets: dict) -> np.ndarray:
    """Pool positions of the subset ``name`` selects with the pretrained model."""
    pool: Features = sets["pool"]
    scorer = make_scorer(name, budget, seed, sets)
    scorer.text_encoder = _PromptFeatures(model, sets)
    with torch.enable_grad():
        scorer.prepare(model.endpoint(), sets["target"].pairs(), pool.pairs())
    with torch.no_grad():
        scores = torch.cat([scorer.score(b) for b in pool.pairs().batches(2048)]).double().numpy()
    chosen = select(pool.ids.numpy(), scores, fraction=budget, method=name)
    position = {int(u): i for i, u in enumerate(pool.ids.tolist())}
    return np.array(sorted(position[int(u)] for u in chosen.ids))


def cpt(cfg: Config, sets: dict, state: dict, positions: np.ndarray | None, seed: int) -> dict[str, float]:
    pool: Features = sets["pool"]
    subset = pool if positions is None else pool.index(torch.as_tensor(positions))
    model = train(cfg, subset, epochs=cfg.cpt_epochs, lr=cfg.cpt_lr, seed=seed, state=state)
    return evaluate(model, sets)


def cpt_reselect(cfg: Config, sets: dict, state: dict, budget: float, seed: int) -> tuple[dict, list[float]]:
    """CHIPS re-selected every epoch (= round) by DataSelectionCallback, same steps as one selection + fixed epochs."""
    pl.seed_everything(seed, verbose=False)
    pool: Features = sets["pool"]
    model = _model(cfg, cfg.cpt_lr, state)
    steps = math.ceil(budget * len(pool) / cfg.batch_size)
    data = ScoredSubsetDataModule(FeatureDataset(pool), FeatureDataset(sets["target"]), batch_size=cfg.batch_size,
                                  steps_per_round=steps, seed=seed, normalize="none",
                                  eval_batch_size=2048)  # fmt: skip
    callback = DataSelectionCallback(make_scorer("chips", budget, seed, sets), fraction=budget, every_n_epochs=1,
                                     save_dir="", log=False, progress=False)  # fmt: skip
    _trainer(cfg.cpt_epochs, [callback]).fit(model, datamodule=data)
    overlaps = [h["overlap"] for h in callback.history[1:]]
    return evaluate(model, sets), overlaps


# ----------------------------------------------------------------------------------------------------------------
# end-point fidelity
# ----------------------------------------------------------------------------------------------------------------
def fidelity(cfg: Config, state: dict) -> dict[str, float]:
    """Spearman between end-point alignment and alignment with the last tower blocks trainable (paper: 0.83)."""
    from scipy.stats import spearmanr

    from lightning_chips.data.real import AnimalMNISTPairs, FashionMNISTPairs, OpenClipartPairs
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


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(results: Results, budgets: list[str]) -> str:
    lines = ["| method | budget | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]  # fmt: skip
    for method, by_budget in results.rows.items():
        for budget in [b for b in ["-", *budgets, "100%", "50%"] if b in by_budget]:
            runs = by_budget[budget]
            cells = [_fmt([r[key] for r in runs]) for key, _ in COLUMNS]
            lines.append(f"| {method} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def composition_table(results: Results, budgets: list[str]) -> str:
    """What each one-shot selection holds: its share of target-domain pairs and of mismatched captions."""
    comp = results.extra.get("composition", {})
    pool = results.extra.get("pool_composition", {})
    lines = ["| method | " + " | ".join(f"{b}: target / mismatched" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]  # fmt: skip
    if pool:
        share = f"{100 * pool['target_share']:.0f}% / {100 * pool['mismatched_share']:.0f}%"
        lines.append("| (whole pool) | " + " | ".join(share for _ in budgets) + " |")
    for method in results.rows:
        cells = []
        for b in budgets:
            c = comp.get(f"{method} {b}")
            cells.append("" if c is None else f"{100 * c['target_share']:.0f}% / {100 * c['mismatched_share']:.0f}%")
        if any(cells):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(results: Results, budgets: list[str]) -> str:
    """The markdown the run writes: the main table, then the composition of each selection."""
    parts = [table(results, budgets), "", "Selected target-domain share / mismatched-caption share:", "",
             composition_table(results, budgets)]  # fmt: skip
    fid = results.extra.get("fidelity")
    if fid:
        parts += ["", f"End-point fidelity: Spearman {fid['spearman']:.3f} between end-point alignment "
                  f"({fid['endpoint_params']:,} parameters) and alignment with the last tower blocks trainable "
                  f"({fid['trainable_params']:,} parameters), {fid['pairs']} pool pairs x {fid['targets']} target "
                  f"pairs."]  # fmt: skip
    return "\n".join(parts)


def plot(results: Results, budgets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [float(b.rstrip("%")) for b in budgets]
    for ax, (key, title) in zip(axes, COLUMNS[:2], strict=False):
        for method, by_budget in results.rows.items():
            if method.startswith("chips:") or not all(b in by_budget for b in budgets):
                continue
            means = [100 * statistics.mean(r[key] for r in by_budget[b]) for b in budgets]
            style = "-o" if method.startswith("chips") else "--."
            ax.plot(xs, means, style, label=method, linewidth=2.2 if method.startswith("chips") else 1)
        for ref, color in (("full pool", "black"), ("random 50%", "grey")):
            runs = results.rows.get(ref, {}).get("100%" if ref == "full pool" else "50%")
            if runs:
                ax.axhline(100 * statistics.mean(r[key] for r in runs), color=color, linestyle=":", label=ref)
        ax.set_xlabel("budget (% of the CPT pool)")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def run(cfg: Config, cache: Path, log: Callable[[str], None] = print) -> Results:
    start = time.perf_counter()
    towers = Towers(cfg.image_size)
    sets = build_sets(cfg, towers, cache)
    del towers
    pool: Features = sets["pool"]
    log(f"features ready in {time.perf_counter() - start:.0f}s: general {len(sets['general'])}, pool {len(pool)} "
        f"({int((pool.domain == 2).sum())} target-domain, {int(pool.noisy.sum())} mismatched), target "
        f"{len(sets['target'])}")  # fmt: skip
    pretrained = train(cfg, sets["general"], epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, seed=0, state=None)
    state = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
    results = Results()
    results.add("pretrained (no CPT)", "-", evaluate(pretrained, sets))
    budgets = [f"{round(100 * b)}%" for b in cfg.budgets]
    for seed in cfg.seeds:
        results.add("full pool", "100%", cpt(cfg, sets, state, None, seed))
        results.add("random 50%", "50%", cpt(cfg, sets, state, choose("random", 0.5, seed, pretrained, sets), seed))
    methods = [*METHODS, *(ABLATIONS if cfg.ablations else [])]
    selections = {}
    for method in methods:
        t0 = time.perf_counter()
        for budget, label in zip(cfg.budgets, budgets, strict=True):
            for seed in cfg.seeds:
                if method == "chips-reselect":
                    metrics, overlaps = cpt_reselect(cfg, sets, state, budget, seed)
                    results.extra.setdefault("reselect_overlap", {})[f"{label}/{seed}"] = overlaps
                else:
                    positions = choose(method, budget, seed, pretrained, sets)
                    selections[(method, label, seed)] = positions
                    metrics = cpt(cfg, sets, state, positions, seed)
                    metrics["target_share"] = float((pool.domain[positions] == 2).float().mean())
                    metrics["mismatched_share"] = float(pool.noisy[positions].float().mean())
                results.add(method, label, metrics)
        log(f"{method}: {time.perf_counter() - t0:.0f}s")
    results.extra["composition"] = {
        f"{m} {b}": {"target_share": statistics.mean(r["target_share"] for r in runs),
                     "mismatched_share": statistics.mean(r["mismatched_share"] for r in runs)}
        for m, by in results.rows.items() for b, runs in by.items() if runs and "target_share" in runs[0]
    }  # fmt: skip
    results.extra["pool_composition"] = {"target_share": float((pool.domain == 2).float().mean()),
                                         "mismatched_share": float(pool.noisy.float().mean())}  # fmt: skip
    if cfg.fidelity_pairs:
        t0 = time.perf_counter()
        results.extra["fidelity"] = fidelity(cfg, state)
        log(f"fidelity: {results.extra['fidelity']} ({time.perf_counter() - t0:.0f}s)")
    results.extra["seconds"] = time.perf_counter() - start
    return results


def main(argv: list[str] | None = None) -> Results:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, one budget, small pool, no ablations")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache", help="feature cache directory")
    parser.add_argument("--out", type=Path, default=None, help="directory for table.md, results.json, plot.png")
    parser.add_argument("--render", type=Path, default=None, help="re-render table.md and plot.png from results.json")
    args = parser.parse_args(argv)
    if args.render is not None:
        payload = json.loads(args.render.read_text())
        results = Results(payload["rows"], payload["extra"])
        budgets = [f"{round(100 * b)}%" for b in payload["config"]["budgets"]]
        (args.render.parent / "table.md").write_text(render(results, budgets) + "\n")
        if len(budgets) > 1:
            plot(results, budgets, args.render.parent / "plot.png")
        print(render(results, budgets))
        return results
    cfg = QUICK if args.quick else Config()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = run(cfg, args.cache)
    budgets = [f"{round(100 * b)}%" for b in cfg.budgets]
    text = render(results, budgets)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(text + "\n")
        payload = {
            "config": asdict(cfg),
            "rows": results.rows,
            "extra": results.extra,
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/selection_quality.py" + (" --quick" if args.quick else ""),
        }
        (args.out / "results.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
        if len(budgets) > 1:
            plot(results, budgets, args.out / "plot.png")
    return results


if __name__ == "__main__":
    main()
