"""Re-selection below the floor: candidate rounds (``rescore=CandidateRescore(widen, explore)``) against full
re-scoring, in quality and in wall time.

Quality (the selection-quality benchmark's pools and model, benchmarks/selection_quality.py): CPT with the
recommended ``CHIPS()`` re-selecting every epoch through DataSelectionCallback, at 10/20/30 % budgets and 3 seeds,
with full re-scoring and with candidate rounds at a few (widen, explore) settings. Reported per setting: target and
general zero-shot acc1, the last selection's composition, the pool share encoded per candidate round, and the
overlap of each candidate round's selection with the selection a full round would have made **at the same moment**
(same model, a copy of the scorer; global random state restored, so the run itself is unchanged).

Wall time (``--part time``): CPT of the quickstart's tiny open_clip ViT on the built-in two-domain pool, one round
per pass over the selection, full vs candidate rounds side by side (alternating, 3 repeats): fit seconds, the
rounds' seconds and their share of the fit, pairs encoded.

Training features (both parts): what a training step computes that a round could reuse. A callback records the
pre-projection features of every training batch (the towers' outputs at that step's parameters, in train mode, under
the training transform) and, after each round, scores them with the round's prepared scorer: the rank correlation
with the round's fresh scores of the same pairs and the overlap of the selection they would give.

    python benchmarks/reselect_cost.py --out docs/benchmarks/reselect     # both parts, both scenarios (~1 h CPU)
    python benchmarks/reselect_cost.py --part time                         # the wall-time part only (minutes)
    python benchmarks/reselect_cost.py --part quality --scenario standard --seeds 0   # one quality cell
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import selection_quality as sq  # noqa: E402

from lightning_chips.adapters import resolve_adapter  # noqa: E402
from lightning_chips.callback import DataSelectionCallback  # noqa: E402
from lightning_chips.data.subset import ScoredSubsetDataModule  # noqa: E402
from lightning_chips.features import PairFeatures  # noqa: E402
from lightning_chips.rescore import CandidateRescore  # noqa: E402
from lightning_chips.scoring import CHIPS  # noqa: E402
from lightning_chips.selection import select  # noqa: E402

SETTINGS: dict[str, CandidateRescore | None] = {
    "full": None,
    "default": CandidateRescore(),
    "w1.5 floor 1024": CandidateRescore(widen=1.5, min_anchor=1024),
    "w1.0 floor 1024": CandidateRescore(widen=1.0, min_anchor=1024),
    "w1.5 e0.025 a0.025 no floor": CandidateRescore(widen=1.5, explore=0.025, anchor=0.025, min_anchor=2),
}
"""Full re-scoring and the candidate settings compared with it: ``CandidateRescore()`` (widen 1.2, explore and anchor
2.5 %, at least 512 anchor pairs), the first default (widen 1.5, at least 1,024 anchor pairs: CHIPS()'s whole
bank), that floor without widening (the last selection itself, the anchor and the exploration), and the anchor
without a floor (2.5 % of these small pools: 75-158 pairs)."""

BUDGETS = (0.1, 0.2, 0.3)
SEEDS = (0, 1, 2)
SCENARIOS = ("standard", "indomain")


# ----------------------------------------------------------------------------------------------------------------
# instruments
# ----------------------------------------------------------------------------------------------------------------
class ShadowedSelection(DataSelectionCallback):
    """DataSelectionCallback that, before each candidate round, runs the full round the same moment would have run
    (a copy of the scorer, every pair, nothing written or installed) and keeps its selection in :attr:`full`.
    The global random states are restored afterwards, so the fit is the one it would have been without it."""

    def __init__(self, *args, shadow: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shadow = shadow
        self.full: dict[int, np.ndarray] = {}

    def run_round(self, trainer, pl_module, *, at_epoch_end=False):
        if self.shadow and self.rescore is not None and self.round > 0:
            twin = copy.copy(self)
            twin.scorer, twin.rescore, twin.candidates = copy.deepcopy(self.scorer), None, None
            twin.save_dir, twin.log, twin.history, twin.gallery = "", False, [], 0
            numpy_state = np.random.get_state()
            selection = trainer.datamodule.selection
            with torch.random.fork_rng(devices=[]):
                full = DataSelectionCallback.run_round(twin, trainer, pl_module, at_epoch_end=at_epoch_end)
            np.random.set_state(numpy_state)
            trainer.datamodule.selection = selection
            self.full[self.round] = np.sort(full.ids)
        return super().run_round(trainer, pl_module, at_epoch_end=at_epoch_end)


class TrainingFeatures(pl.Callback):
    """Records the pre-projection features a training step computes (at that step's parameters, train mode, the
    training batch as the training loader gave it) and, after each round of ``selector``, scores them with the
    round's prepared scorer against the round's fresh scores of the same pairs."""

    def __init__(self, selector: DataSelectionCallback) -> None:
        self.selector = selector
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rounds: list[dict[str, float]] = []
        self.rounds_before = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.rounds_before = len(self.selector.history)

    @torch.no_grad()
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        adapter = resolve_adapter(pl_module, self.selector.adapter)
        image, text = adapter.image_features(batch["image"]), adapter.text_features(batch["text"])
        for i, uid in enumerate(batch["id"].tolist()):
            self.seen[int(uid)] = (image[i].float().cpu(), text[i].float().cpu())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.seen or len(self.selector.history) == self.rounds_before:  # no round at this epoch's end
            self.seen.clear()
            return
        rounds = self.selector.round_dir(trainer)
        with np.load(rounds / f"round_{self.selector.round - 1:04d}.npz") as f:
            ids, fresh, selected = f["ids"], f["scores"].astype(np.float64), f["selected"]
        position = {int(u): i for i, u in enumerate(ids.tolist())}
        reused_ids = [u for u in self.seen if u in position]
        if len(reused_ids) >= 3:
            feats = PairFeatures(torch.tensor(reused_ids), torch.stack([self.seen[u][0] for u in reused_ids]),
                                 torch.stack([self.seen[u][1] for u in reused_ids]), None)  # fmt: skip
            device = next(pl_module.parameters()).device
            with torch.no_grad():
                reused = self.selector.scorer.score(feats.to(device)).double().cpu().numpy()
            rows = np.array([position[u] for u in reused_ids])
            mixed = fresh.copy()
            mixed[rows] = reused
            would = select(ids, mixed, count=int(selected.sum()))
            self.rounds.append({
                "pairs": float(len(rows)),
                "spearman": _spearman(fresh[rows], reused),
                "selection_overlap": float(np.isin(would.ids, ids[selected]).mean()),
            })  # fmt: skip
        self.seen.clear()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _trainer(epochs: int, callbacks: list, root: Path) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                      num_sanity_val_steps=0, default_root_dir=root)  # fmt: skip


def reselect_fit(model: pl.LightningModule, data: ScoredSubsetDataModule, scorer, *, fraction: float, epochs: int,
                 rescore: CandidateRescore | None, seed: int, root: Path, shadow: bool = True,
                 features: bool = True) -> dict:  # fmt: skip
    """One CPT fit re-selecting every epoch; what it measured (module docstring)."""
    selector = ShadowedSelection(scorer, fraction=fraction, every_n_epochs=1, rescore=rescore, seed=seed,
                                 save_dir=str(root / "rounds"), overwrite=True, log=False, progress=False,
                                 shadow=shadow)  # fmt: skip
    callbacks: list = [selector]
    recorder = TrainingFeatures(selector) if features else None
    if recorder is not None:
        callbacks.append(recorder)
    start = time.perf_counter()
    _trainer(epochs, callbacks, root).fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    rounds = []
    for r in range(selector.round):
        with np.load(root / "rounds" / f"round_{r:04d}.npz") as f:
            chosen = np.sort(f["ids"][f["selected"]])
            full = selector.full.get(r)
            rounds.append({
                "encoded": int(f["encoded"]), "pool_pairs": int(f["pool_pairs"]),
                "seconds": float(f["round_seconds"]),
                "full_overlap": None if full is None else float(np.isin(chosen, full).mean()),
            })  # fmt: skip
    return {
        "fit_seconds": seconds,
        "rounds": rounds,
        "reuse": [] if recorder is None else recorder.rounds,
        "positions": np.sort(np.asarray(selector.selection.indices)),
    }


# ----------------------------------------------------------------------------------------------------------------
# quality: the selection-quality benchmark's pools
# ----------------------------------------------------------------------------------------------------------------
def quality_run(cfg: sq.Config, sets: dict, state: dict, setting: str, budget: float, seed: int, root: Path,
                shadow: bool = True) -> dict:  # fmt: skip
    pl.seed_everything(seed, verbose=False)
    pool = sets["pool"]
    model = sq._model(cfg, cfg.cpt_lr, state)
    steps = math.ceil(budget * len(pool) / cfg.batch_size)
    data = ScoredSubsetDataModule(sq.FeatureDataset(pool), sq.FeatureDataset(sets["target"]),
                                  batch_size=cfg.batch_size, steps_per_round=steps, seed=seed, normalize="none",
                                  eval_batch_size=2048)  # fmt: skip
    out = reselect_fit(model, data, CHIPS(seed=seed), fraction=budget, epochs=cfg.cpt_epochs,
                       rescore=SETTINGS[setting], seed=seed, root=root, features=setting == "full",
                       shadow=shadow)  # fmt: skip
    metrics = sq.evaluate(model, sets)
    metrics.update(sq.composition(sets, out.pop("positions")))
    return {**metrics, **out}


def quality(scenarios: list[str], budgets: list[float], seeds: list[int], settings: list[str], work: Path,
            shadow_seeds: list[int], log=print, saved=lambda results: None) -> dict:  # fmt: skip
    results: dict = {}
    for scenario in scenarios:
        t0 = time.perf_counter()
        base, changes = sq.VARIANTS.get(scenario, (scenario, {}))  # a noise variant: its base pool, other captions
        cfg = dataclasses.replace(sq.Config(), **changes)
        sets = sq.build_sets(cfg, None, ROOT / "benchmarks" / ".cache", base)
        pretrained = sq.train(cfg, sets["general"], epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, seed=0,
                              state=None)  # fmt: skip
        state = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
        for budget in budgets:
            for setting in settings:
                for seed in seeds:
                    run = quality_run(cfg, sets, state, setting, budget, seed, work / f"{scenario}-{budget}-{seed}",
                                      shadow=seed in shadow_seeds)  # fmt: skip
                    results.setdefault(scenario, {}).setdefault(f"{round(100 * budget)}%", {}).setdefault(
                        setting, []).append(run)  # fmt: skip
                saved(results)  # a cell at a time: an interrupted run keeps what it measured
                log(f"[{scenario} {round(100 * budget)}%] {setting}: " + _cell(results[scenario]
                    [f"{round(100 * budget)}%"][setting]) + f" ({time.perf_counter() - t0:.0f}s)")  # fmt: skip
    return results


def _mean_sd(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    values = [v * scale for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def _encoded_share(run: dict) -> float:
    later = run["rounds"][1:]
    return statistics.mean(r["encoded"] / max(r["pool_pairs"], 1) for r in later) if later else 1.0


def _full_overlap(run: dict) -> float | None:
    values = [r["full_overlap"] for r in run["rounds"][1:] if r["full_overlap"] is not None]
    return statistics.mean(values) if values else None


def _cell(runs: list[dict]) -> str:
    target, general = _mean_sd([r["target_acc1"] for r in runs]), _mean_sd([r["general_acc1"] for r in runs])
    return f"target {target}, general {general}, encoded {_mean_sd([_encoded_share(r) for r in runs], digits=0)} %"


def quality_table(results: dict) -> str:
    lines = []
    for scenario, by_budget in results.items():
        lines += [f"### {scenario}", "",
                  "| budget | rescore | target acc1 | general acc1 | Δ target vs full | Δ general vs full | "
                  "encoded per round (% of pool) | overlap with a full round (shadowed seeds) | target share | "
                  "mismatched | uninformative |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for budget, by_setting in by_budget.items():
            full = by_setting.get("full")
            for setting, runs in by_setting.items():

                def delta(key: str, runs: list[dict] = runs, setting: str = setting, full=full) -> str:
                    if full is None or setting == "full":
                        return "-"
                    return _mean_sd([a[key] - b[key] for a, b in zip(runs, full, strict=True)])  # same seeds

                lines.append(
                    f"| {budget} | {setting} | {_mean_sd([r['target_acc1'] for r in runs])} | "
                    f"{_mean_sd([r['general_acc1'] for r in runs])} | {delta('target_acc1')} | "
                    f"{delta('general_acc1')} | {_mean_sd([_encoded_share(r) for r in runs], digits=0)} | "
                    f"{_mean_sd([_full_overlap(r) for r in runs])} | {_mean_sd([r['target_share'] for r in runs])} | "
                    f"{_mean_sd([r['mismatched_share'] for r in runs])} | "
                    f"{_mean_sd([r['uninformative_share'] for r in runs])} |"
                )
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# wall time: a tiny open_clip CPT
# ----------------------------------------------------------------------------------------------------------------
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
"""The quickstart's model (examples/quickstart.yaml)."""


def time_run(setting: str, *, pool: int, fraction: float, epochs: int, batch_size: int, seed: int, root: Path,
             features: bool = True) -> dict:  # fmt: skip
    from lightning_chips import OpenCLIPModule, TwoDomainPairs

    pl.seed_everything(seed, verbose=False)
    model = OpenCLIPModule(model_config=copy.deepcopy(TINY_CLIP), lr=1e-3)
    steps = math.ceil(fraction * pool / batch_size)  # one round per pass over the selection
    data = ScoredSubsetDataModule(TwoDomainPairs(pool, target_fraction=0.2, noise_fraction=0.1, seed=0),
                                  TwoDomainPairs(128, target_fraction=1.0, split="val"), batch_size=batch_size,
                                  steps_per_round=steps, eval_batch_size=256, seed=seed)  # fmt: skip
    scorer = CHIPS(sketch_dim=512, bank_size=1024, curvature_samples=4096, seed=seed)  # the quickstart's sizes
    out = reselect_fit(model, data, scorer, fraction=fraction, epochs=epochs, rescore=SETTINGS[setting], seed=seed,
                       root=root, shadow=False, features=features)  # fmt: skip
    out.pop("positions")
    return out


def wall_time(settings: list[str], repeats: int, work: Path, *, pool: int, epochs: int, log=print) -> dict:
    results: dict = {s: [] for s in settings}
    for repeat in range(repeats):  # alternating, so a busier moment of the machine hits every setting alike
        for setting in settings:
            run = time_run(setting, pool=pool, fraction=0.3, epochs=epochs, batch_size=64, seed=repeat,
                           root=work / f"time-{setting}-{repeat}", features=repeat == 0)  # fmt: skip
            results[setting].append(run)
            rounds = sum(r["seconds"] for r in run["rounds"])
            log(f"[time] {setting} #{repeat}: fit {run['fit_seconds']:.1f}s, rounds {rounds:.1f}s, encoded "
                f"{[r['encoded'] for r in run['rounds']]}")  # fmt: skip
    return results


def time_table(results: dict) -> str:
    lines = ["| rescore | fit (s) | rounds (s) | rounds' share of the fit | rounds 1+ (s per round) | encoded per "
             "round 1+ (% of pool) |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for setting, runs in results.items():
        fit = [r["fit_seconds"] for r in runs]
        rounds = [sum(x["seconds"] for x in r["rounds"]) for r in runs]
        later = [statistics.mean(x["seconds"] for x in r["rounds"][1:]) for r in runs]
        lines.append(f"| {setting} | {_mean_sd(fit, 1)} | {_mean_sd(rounds, 1)} | "
                     f"{_mean_sd([a / b for a, b in zip(rounds, fit, strict=True)], digits=0)} % | "
                     f"{_mean_sd(later, 1, 2)} | "
                     f"{_mean_sd([_encoded_share(r) for r in runs], digits=0)} |")  # fmt: skip
    return "\n".join(lines)


def reuse_table(rows: dict[str, list[dict]]) -> str:
    lines = ["| run | rounds | trained pairs per round | Spearman (training-step vs fresh scores) | selection "
             "overlap if reused |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, rounds in rows.items():
        if not rounds:
            continue
        lines.append(f"| {name} | {len(rounds)} | {statistics.mean(r['pairs'] for r in rounds):.0f} | "
                     f"{_mean_sd([r['spearman'] for r in rounds], 1, 3)} | "
                     f"{_mean_sd([r['selection_overlap'] for r in rounds])} % |")  # fmt: skip
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["quality", "time", "both"], default="both")
    parser.add_argument("--scenario", nargs="+", choices=sq.SCENARIOS, default=list(SCENARIOS),
                        help="selection_quality.py scenarios (default: standard, indomain)")  # fmt: skip
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--time-pool", type=int, default=6400, help="pool pairs of the wall-time fit")
    parser.add_argument("--time-epochs", type=int, default=6, help="epochs (= rounds) of the wall-time fit")
    parser.add_argument("--repeats", type=int, default=3, help="wall-time repeats per setting")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--work", type=Path, default=Path("/tmp/reselect_cost"), help="round files go here")
    parser.add_argument("--shadow-seeds", nargs="*", type=int, default=[0], help="seeds whose candidate rounds are "
                        "compared with the full round of the same moment (each costs a full round)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="directory for table.md and results.json")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="merge the results.json of runs made "
                        "side by side (e.g. one scenario per core) into --out")  # fmt: skip
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    torch.set_num_threads(args.threads)
    payload: dict = {"command": "python benchmarks/reselect_cost.py " + " ".join(argv if argv is not None
                                                                                 else sys.argv[1:]),
                     "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                                f"{args.threads} thread(s)"}  # fmt: skip
    if args.part in ("quality", "both"):

        def saved(results: dict) -> None:
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "partial.json").write_text(json.dumps({**payload, "quality": results}, default=float))

        payload["quality"] = quality(args.scenario, args.budgets, args.seeds, args.settings, args.work,
                                     args.shadow_seeds, saved=saved)  # fmt: skip
    if args.part in ("time", "both"):
        settings = [s for s in args.settings if s in ("full", "default")] or args.settings
        payload["time"] = wall_time(settings, args.repeats, args.work, pool=args.time_pool, epochs=args.time_epochs)
    write(payload, args.out)
    return payload


def render(payload: dict) -> str:
    text = []
    if "quality" in payload:
        text += ["## Quality", "", quality_table(payload["quality"])]
        reuse = {f"{scenario} {budget} full": [x for run in runs.get("full", []) for x in run["reuse"]]
                 for scenario, by_budget in payload["quality"].items()
                 for budget, runs in by_budget.items()}  # fmt: skip
        text += ["Training features, frozen towers (heads-only CPT on cached features):", "", reuse_table(reuse), ""]
    if "time" in payload:
        text += ["## Wall time", "", time_table(payload["time"]), ""]
        reuse = {f"tiny open_clip, {s}": [x for run in runs for x in run["reuse"]]
                 for s, runs in payload["time"].items()}  # fmt: skip
        text += ["Training features, trainable towers (tiny open_clip):", "", reuse_table(reuse), ""]
    return "\n".join(text)


def write(payload: dict, out: Path | None) -> None:
    rendered = render(payload)
    print(rendered)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(f"Command: `{payload['command']}` ({payload['machine']})\n\n{rendered}\n")
        (out / "results.json").write_text(json.dumps(payload, indent=1, default=float))


def merge(paths: list[Path], out: Path | None) -> dict:
    """One payload from the results.json of runs made side by side (their quality cells and wall-time runs)."""
    merged: dict = {"command": "", "machine": ""}
    for path in paths:
        part = json.loads(path.read_text())
        merged["command"] += ("; " if merged["command"] else "") + part["command"]
        merged["machine"] = part["machine"]
        for scenario, by_budget in part.get("quality", {}).items():
            for budget, by_setting in by_budget.items():
                merged.setdefault("quality", {}).setdefault(scenario, {}).setdefault(budget, {}).update(by_setting)
        if "time" in part:
            merged["time"] = part["time"]
    merged["command"] += f"; python benchmarks/reselect_cost.py --merge {' '.join(map(str, paths))} --out {out}"
    write(merged, out)
    return merged


if __name__ == "__main__":
    main()
