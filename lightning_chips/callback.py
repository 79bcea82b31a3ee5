"""``DataSelectionCallback``: score the pool, select, and re-select during CLIP continual pre-training.

The callback owns hooks, schedule, state and round files; the steps a round shares with ``lightning-chips score``
(preparing and scoring, the DDP agreement and gathers, bad-sample bookkeeping) are in :mod:`lightning_chips.engine`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_chips.adapters import CLIPAdapter, resolve_adapter
from lightning_chips.data.checks import BadPair
from lightning_chips.data.datamodule import resolve_tokenizer
from lightning_chips.data.webdataset import BadShardSample, ShardReport
from lightning_chips.engine import (
    NO_ID,
    agree,
    all_bad_message,
    bad_arrays,
    check_unique,
    extract_skipping_bad,
    gather_bad,
    gather_features,
    gather_rows,
    gather_stream_bad,
    name_bad,
    prepare_scorer,
    score_batch,
    shard_indices,
    skip_bad,
    skip_reports,
    stream_bad_arrays,
)
from lightning_chips.features import PairFeatures, extract_features, iter_features
from lightning_chips.metrics import PromptEncoder
from lightning_chips.scoring import RoundContext, Scorer, build_scorer
from lightning_chips.selection import MODES, Mode, Selection, budget_for, select, write_round_file

__all__ = ["NO_ID", "DataSelectionCallback"]


class DataSelectionCallback(Callback):
    """Select the pool pairs a CLIP trains on, and re-select them as the model moves.

    One selection round: resolve the CLIP (:func:`~lightning_chips.adapters.resolve_adapter`); extract the
    target's and a pool sample's pre-projection features and ``scorer.prepare`` on them; stream the whole pool
    through the towers and ``scorer.score`` (each rank scores its shard; scores are all-gathered); build the
    :class:`~lightning_chips.selection.Selection` of ``round(fraction * N)`` pairs, identical on every rank
    (ties broken by id); hand it to the :class:`~lightning_chips.data.ScoredSubsetDataModule`, whose sampler
    draws the next epoch's batches from it; write ``save_dir/round_{r:04d}.npz`` atomically; log the selected
    fraction, the overlap with the previous round and score quantiles, and print a one-line summary.

    Pool pairs that fail to load or to pass the checks (:class:`~lightning_chips.data.checks.CheckedPairs`) are
    skipped: never selected, counted in the summary line and in :attr:`history` (``"skipped"``,
    ``"target_skipped"``), listed in :attr:`skipped`, and named in the round file (``bad_indices``, ``bad_ids``
    with :data:`NO_ID` for a pair without an id, ``bad_reasons``). A streaming pool
    (:class:`~lightning_chips.data.WebDatasetDataModule`) has no indices: its skipped samples are
    :class:`~lightning_chips.data.webdataset.BadShardSample` s, named in the round file by ``bad_ids`` (the uid,
    or :data:`NO_ID` when the json gives none), ``bad_keys``, ``bad_shards`` and ``bad_reasons``, and a shard
    that could not be read to the end is listed in :attr:`shard_errors`, in the round file
    (``unreadable_shards``, ``shard_errors``) and in :attr:`history` (``"unreadable_shards"``). Under DDP every
    rank agrees that its part of a round succeeded before each all-gather, so an exception on one rank ends the
    fit on every rank instead of leaving the others waiting.

    Round 0 is scored with the starting model before the first training step (the CHIPS paper's one-shot
    selection) unless ``warmup_steps > 0``, in which case the whole pool is sampled until the first epoch end at
    or after ``warmup_steps``. Later rounds happen at epoch ends (one epoch = ``steps_per_round`` steps of the
    data module) when :meth:`should_select` says so: every ``every_n_epochs`` epochs, or at the first epoch end
    at least ``every_n_steps`` steps after the previous round. With neither, selection is one-shot.

    Args:
        scorer: a :class:`~lightning_chips.scoring.Scorer` or a registered name (``"chips"``, ``"random"``).
        fraction: share of the pool to keep, in (0, 1].
        every_n_steps: re-select at the first epoch end at least this many steps after the previous round.
        every_n_epochs: re-select every this many epochs (rounds).
        warmup_steps: train on the whole pool for this many steps before the first selection.
        target: target-domain pairs (default: the data module's ``target``).
        pool_sample: pool pairs given to ``scorer.prepare`` (bank, curvature); ``None`` = the whole pool, whose
            features are then extracted once and reused for scoring.
        mode: ``"topk"``, ``"weighted"`` or ``"stratified"`` (see :func:`~lightning_chips.selection.select`).
        temperature: sampling temperature of ``mode="weighted"``.
        seed: seed of the pool sample (with the round).
        save_dir: where round files go (default: ``<trainer.log_dir>/selection``); ``""`` disables them.
        log: log selection metrics to the trainer's loggers.
        progress: show progress bars for the scoring passes (rank 0).
        adapter: an explicit :class:`~lightning_chips.adapters.CLIPAdapter` for a model
            :func:`~lightning_chips.adapters.resolve_adapter` does not know.

    Raises:
        ValueError: on a fraction outside (0, 1], both or negative schedules, an unknown scorer or mode, or an
            empty target when the scorer needs one.

    Example::

        >>> from lightning_chips import DataSelectionCallback
        >>> from lightning_chips.scoring import CHIPS
        >>> callback = DataSelectionCallback(CHIPS(sketch_dim=512), fraction=0.3, every_n_epochs=1)
        >>> # trainer = Trainer(callbacks=[callback]); trainer.fit(model, datamodule=ScoredSubsetDataModule(...))
    """

    def __init__(
        self,
        scorer: Scorer | str = "chips",
        fraction: float = 0.3,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        warmup_steps: int = 0,
        target: Dataset | None = None,
        pool_sample: int | None = None,
        mode: Mode = "topk",
        temperature: float = 1.0,
        seed: int = 0,
        save_dir: str | None = None,
        log: bool = True,
        progress: bool = True,
        adapter: CLIPAdapter | None = None,
    ) -> None:
        super().__init__()
        if isinstance(scorer, str):
            scorer = build_scorer(scorer)
        if not isinstance(scorer, Scorer):
            raise ValueError(f"`scorer` must be a lightning_chips Scorer or a registered name, got {type(scorer)}.")
        budget_for(1, fraction)  # validates fraction in (0, 1]
        if every_n_steps is not None and every_n_epochs is not None:
            raise ValueError("Pass at most one of `every_n_steps` and `every_n_epochs` (neither = one-shot selection).")
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1 or None, got {value}.")
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}.")
        if pool_sample is not None and pool_sample < 2:
            raise ValueError(f"`pool_sample` must be >= 2 or None (the whole pool), got {pool_sample}.")
        if mode not in MODES:
            raise ValueError(f"Unknown `mode` {mode!r}; use one of {MODES}.")
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        if target is not None and len(target) == 0 and scorer.requires_target:
            raise ValueError(
                f"`target` is empty but the {type(scorer).__name__} scorer needs target pairs; pass a non-empty "
                "target dataset (or None to use the data module's)."
            )
        self.scorer = scorer
        self.fraction = fraction
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.warmup_steps = warmup_steps
        self.target = target
        self.pool_sample = pool_sample
        self.mode: Mode = mode
        self.temperature = temperature
        self.seed = seed
        self.save_dir = save_dir
        self.log = log
        self.progress = progress
        self.adapter = adapter

        self.round = 0  # the index the next selection round gets
        self.context = RoundContext(seed=seed)  # the context of the last (or running) round
        self.selection: Selection | None = None
        self.last_step = 0
        self.last_epoch = 0  # completed epochs at the last selection
        self.history: list[dict[str, float]] = []
        self.skipped: list[BadPair | BadShardSample] = []  # the last round's pool pairs that could not be used
        self.shard_errors: dict[str, str] = {}  # streaming pools: the last round's unreadable shards -> error
        self._restored = False

    @property
    def state_key(self) -> str:
        return f"DataSelectionCallback[scorer={type(self.scorer).__name__}, fraction={self.fraction}]"

    # -- schedule ------------------------------------------------------------------------------------------------
    def should_select(self, step: int, epoch: int) -> bool:
        """Whether to run a selection round at the end of epoch ``epoch`` (0-based) at global step ``step``.

        Override it for custom schedules (like Lightning's ``WeightAveraging.should_update``).
        """
        if self.selection is None:
            return step >= self.warmup_steps
        if self.every_n_epochs is not None:
            return epoch + 1 - self.last_epoch >= self.every_n_epochs
        if self.every_n_steps is not None:
            return step - self.last_step >= self.every_n_steps
        return False

    # -- hooks ---------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "pool_dataloader") or not hasattr(datamodule, "selection"):
            raise ValueError(
                "DataSelectionCallback needs a lightning_chips.data.ScoredSubsetDataModule (or a data module with "
                "`pool`, `selection`, `pool_dataloader()` and `target_dataloader()`); pass it as "
                "`trainer.fit(model, datamodule=...)`."
            )
        resolve_adapter(pl_module, self.adapter)  # fail before training if the CLIP cannot be reached
        pool = getattr(datamodule, "pool", None)
        pool_ids = getattr(pool, "ids", None)  # the built-in and real datasets list their ids without decoding
        if pool_ids is not None and not getattr(datamodule, "streaming", False) and len(pool_ids) == len(pool):
            check_unique(np.asarray(pool_ids, dtype=np.int64), "the pool (checked before training)")
        target = self.target if self.target is not None else getattr(datamodule, "target", None)
        if self.scorer.requires_target and (target is None or len(target) == 0):
            raise ValueError(
                f"The {type(self.scorer).__name__} scorer needs target pairs: pass `target` to the callback or to "
                "ScoredSubsetDataModule."
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._restored and self.selection is not None:
            trainer.datamodule.selection = self.selection
        elif self.selection is None and self.warmup_steps == 0:
            self.run_round(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if _is_last_epoch(trainer):
            return
        if self.should_select(trainer.global_step, trainer.current_epoch):
            self.run_round(trainer, pl_module, at_epoch_end=True)

    # -- one round -----------------------------------------------------------------------------------------------
    def run_round(self, trainer: Trainer, pl_module: LightningModule, *, at_epoch_end: bool = False) -> Selection:
        """Score the pool with the current model and install the new selection (all ranks).

        Pool pairs that fail to load or to pass the checks (``batch["bad"]`` of the data module's scoring
        loaders; for a streaming pool, the skipped samples of the shard reports in ``batch["reports"]``) are
        skipped: never selected, counted in the summary line and :attr:`history` (``"skipped"``), and named in the
        round file. Each is counted once per round: a streaming pool's bad samples are counted from the scoring
        pass over each rank's shards, not again from the pool sample pass that reads some of the same shards.
        Under DDP the ranks agree that each local step succeeded before every all-gather: an exception on one
        rank is raised there, and the others raise a ``RuntimeError`` naming that rank and its error instead of
        waiting at the gather.
        """
        start = time.perf_counter()
        datamodule = trainer.datamodule
        adapter = resolve_adapter(pl_module, self.adapter)
        rank, world = trainer.global_rank, trainer.world_size
        show = self.progress and trainer.is_global_zero
        device = pl_module.device
        r = self.round
        collate_tokenizer = getattr(getattr(datamodule, "collate", None), "tokenizer", None)
        tokenizer = collate_tokenizer or resolve_tokenizer(None, None, pl_module)
        lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else 1.0
        self.context = RoundContext(round=r, learning_rate=lr, text_encoder=PromptEncoder(adapter, tokenizer),
                                    seed=self.seed)  # fmt: skip

        bad: dict[int, BadPair] = {}  # this rank's pool pairs that could not be used, by dataset index
        target_bad: dict[int, BadPair] = {}
        stream_bad: list[BadShardSample] = []  # streaming pools: this rank's skipped samples and unreadable shards
        shard_errors: dict[str, str] = {}
        target = None
        if self.scorer.requires_target:
            target_set = self.target if self.target is not None else datamodule.target
            own = shard_indices(np.arange(len(target_set)), rank, world)
            local = agree(
                trainer, r, "the target features",
                lambda: extract_skipping_bad(adapter, datamodule.target_dataloader(target_set, own), target_bad,
                                             device=device, progress=show, description=f"round {r}: target"),
            )  # fmt: skip
            target = gather_features(pl_module, local)
        streaming = bool(getattr(datamodule, "streaming", False))
        if streaming:
            own_ids, own_scores, own_labels = self._score_stream(trainer, pl_module, adapter, target, show,
                                                                 stream_bad, shard_errors)  # fmt: skip
            own_indices, n = own_ids.numpy(), None  # a stream has no positions: the ids stand in for them
        else:
            own_ids, own_scores, own_labels, own_indices = self._score_map_style(
                trainer, pl_module, adapter, target, show, bad
            )
            n = None

        scores = gather_rows(pl_module, own_scores).numpy()
        ids = gather_rows(pl_module, own_ids).numpy()
        indices = gather_rows(pl_module, torch.as_tensor(own_indices)).numpy()
        labels = None if own_labels is None else gather_rows(pl_module, own_labels).numpy()
        skipped: list[BadPair] | list[BadShardSample]
        if streaming:
            skipped, shard_errors = gather_stream_bad(trainer, stream_bad, shard_errors)
        else:
            skipped = gather_bad(trainer, bad)
        target_skipped = gather_bad(trainer, target_bad)
        n = len(ids) if n is None else n
        check_unique(ids, f"round {r}")
        selection = select(
            ids, scores, fraction=self.fraction, mode=self.mode, labels=labels, indices=indices,
            temperature=self.temperature, round=r, method=type(self.scorer).__name__,
        )  # fmt: skip
        previous = self.selection
        self.selection = selection
        self.skipped, self.shard_errors = list(skipped), shard_errors
        datamodule.selection = selection
        self.last_step, self.last_epoch = trainer.global_step, trainer.current_epoch + int(at_epoch_end)
        self.round = r + 1
        metrics = self._metrics(selection, previous, scores, n)
        metrics["skipped"] = float(len(skipped))
        metrics["target_skipped"] = float(len(target_skipped))
        if streaming:
            metrics["unreadable_shards"] = float(len(shard_errors))
        self.history.append(metrics)

        def write() -> None:  # rank 0 writes; the others learn whether it could
            if trainer.is_global_zero:
                arrays = stream_bad_arrays(skipped, shard_errors) if streaming else bad_arrays(skipped)
                self._write(trainer, selection, ids, scores, arrays)

        agree(trainer, r, "the round file", write)
        if trainer.is_global_zero:
            if self.log:
                for logger in trainer.loggers:
                    logger.log_metrics({f"selection/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
            overlap = "n/a" if previous is None else f"{metrics['overlap']:.1%}"
            for what, found in (("pool", skipped), ("target", target_skipped)):
                if found:
                    rank_zero_warn(
                        f"[lightning-chips] round {r}: skipped {len(found)} {what} pairs that could not be used "
                        f"(never selected; the round file lists them all): {name_bad(found)}"
                    )
            if shard_errors:
                named = "; ".join(f"{url}: {error}" for url, error in list(shard_errors.items())[:5])
                rank_zero_warn(
                    f"[lightning-chips] round {r}: {len(shard_errors)} pool shards could not be read to the end (the "
                    f"pairs before the damage were scored; the round file lists them): {named}"
                )
            skipped_text = f", skipped {len(skipped)} bad pairs" if skipped else ""
            if shard_errors:
                skipped_text += f", {len(shard_errors)} unreadable shards"
            rank_zero_info(
                f"[lightning-chips] round {r} at step {trainer.global_step}: selected {len(selection)}/{n} "
                f"({metrics['fraction']:.1%}) by {selection.method}{skipped_text}, overlap with previous round "
                f"{overlap}, score q10/q50/q90 = {metrics['score_q10']:.4g}/{metrics['score_q50']:.4g}/"
                f"{metrics['score_q90']:.4g}; {self.scorer.summary()}; {time.perf_counter() - start:.1f}s"
            )
        return selection

    def _score_map_style(self, trainer: Trainer, pl_module: LightningModule, adapter: CLIPAdapter,
                         target: PairFeatures | None, show: bool, bad: dict[int, BadPair]) -> tuple:  # fmt: skip
        """Score this rank's contiguous share of a map-style pool; its bad pairs go to ``bad``. Returns the ids,
        scores, labels and dataset indices of the pairs that were scored."""
        datamodule, device, r = trainer.datamodule, pl_module.device, self.round
        rank, world = trainer.global_rank, trainer.world_size
        n = len(datamodule.pool)
        all_indices = np.arange(n, dtype=np.int64)
        own_indices = shard_indices(all_indices, rank, world)
        whole = self.pool_sample is None or self.pool_sample >= n
        if whole:
            own_features = agree(
                trainer, r, "the pool features",
                lambda: extract_skipping_bad(adapter, datamodule.pool_dataloader(own_indices), bad, device=device,
                                             progress=show, description=f"round {r}: pool"),
            )  # fmt: skip
            sample = gather_features(pl_module, own_features)
            check_unique(sample.ids.numpy(), f"round {r}")  # before any scoring work
        else:
            generator = np.random.default_rng([self.seed, r])
            sample_idx = np.sort(generator.choice(n, size=self.pool_sample, replace=False))
            local = agree(
                trainer, r, "the pool sample features",
                lambda: extract_skipping_bad(adapter, datamodule.pool_dataloader(shard_indices(sample_idx, rank,
                                                                                               world)),
                                             {}, device=device, progress=show, description=f"round {r}: pool sample"),
            )  # fmt: skip
            sample = gather_features(pl_module, local)

        def score_own() -> tuple:
            prepare_scorer(self.scorer, adapter.endpoint(), target, sample, self.context, device)
            if whole:
                own_scores = torch.cat([score_batch(self.scorer, b.to(device)) for b in own_features.batches(4096)])
                return own_features.ids, own_scores, own_features.labels
            parts, ids, labels = [], [], []
            stream = iter_features(adapter, skip_bad(datamodule.pool_dataloader(own_indices), bad), device=device,
                                   progress=show, description=f"round {r}: scoring")  # fmt: skip
            for batch in stream:
                parts.append(score_batch(self.scorer, batch))
                ids.append(batch.ids.cpu())
                labels.append(None if batch.labels is None else batch.labels.cpu())
            if not parts:
                raise ValueError(all_bad_message(f"rank {rank}'s share of the pool", bad))
            own_labels = None if any(x is None for x in labels) else torch.cat(labels)
            return torch.cat(ids), torch.cat(parts), own_labels

        own_ids, own_scores, own_labels = agree(trainer, r, "the pool scores", score_own)
        scored = own_indices[~np.isin(own_indices, np.fromiter(bad, dtype=np.int64, count=len(bad)))]
        if len(scored) != len(own_ids):
            raise RuntimeError(
                f"Round {r}: {len(own_ids)} pool pairs were scored on rank {rank} but {len(scored)} were expected "
                f"({len(own_indices)} in its share, {len(bad)} bad); does the pool dataloader drop items?"
            )
        return own_ids, own_scores, own_labels, scored

    def _score_stream(self, trainer: Trainer, pl_module: LightningModule, adapter: CLIPAdapter,
                      target: PairFeatures | None, show: bool, bad: list[BadShardSample],
                      errors: dict[str, str]) -> tuple:  # fmt: skip
        """Score this rank's shards of a streaming (WebDataset) pool; the pool sample is read alike on every rank
        (``pool_sample`` pairs from shards in a seeded order), or gathered from all ranks when it is None.

        The skipped samples of this rank's shards (from the scoring loader's shard reports) go to ``bad`` and the
        shards' read errors to ``errors``; the pool sample pass is not counted (its shards are scored too).
        """
        datamodule, device, r, rank = trainer.datamodule, pl_module.device, self.round, trainer.global_rank
        reports: list[ShardReport] = []

        def account(scored: int) -> None:
            """This rank's shard reports into ``bad`` and ``errors``; their pairs must be the ones scored."""
            for report in reports:
                bad.extend(report.bad_samples())
                if report.error:
                    errors[report.url] = report.error
            read = sum(report.samples for report in reports)
            if reports and read != scored:
                raise RuntimeError(
                    f"Round {r}: {scored} pool pairs were scored on rank {rank} but its shard reports count {read}; "
                    "does the pool dataloader drop items?"
                )

        def scoring_pass(description: str) -> Iterator[PairFeatures]:
            loader = skip_reports(datamodule.pool_dataloader(), reports)
            return iter_features(adapter, loader, device=device, progress=show, description=description)

        if self.pool_sample is None:

            def extract_own() -> PairFeatures:
                parts = [f.to("cpu") for f in scoring_pass(f"round {r}: pool")]
                account(sum(len(p) for p in parts))
                if not parts:
                    what = f"rank {rank}'s shards of the pool"
                    if bad:
                        raise ValueError(f"Every sample of {what} was skipped ({len(bad)}: {name_bad(bad)}).")
                    raise ValueError(f"No pool pairs to extract features from in {what}: are there fewer shards "
                                     "than ranks?")  # fmt: skip
                return PairFeatures.cat(parts)

            own_features = agree(trainer, r, "the pool features", extract_own)
            sample = gather_features(pl_module, own_features)

            def score_all() -> tuple:
                prepare_scorer(self.scorer, adapter.endpoint(), target, sample, self.context, device)
                scores = torch.cat([score_batch(self.scorer, b.to(device)) for b in own_features.batches(4096)])
                return own_features.ids.cpu(), scores, own_features.labels

            return agree(trainer, r, "the pool scores", score_all)

        def score_sampled() -> tuple:
            batches = datamodule.pool_sample(self.pool_sample, r, seed=self.seed)
            sample = extract_features(adapter, batches, device=device, progress=show,
                                      description=f"round {r}: pool sample")  # fmt: skip
            prepare_scorer(self.scorer, adapter.endpoint(), target, sample, self.context, device)
            parts, ids = [], []
            for batch in scoring_pass(f"round {r}: scoring"):
                parts.append(score_batch(self.scorer, batch))
                ids.append(batch.ids.cpu())
            account(sum(len(i) for i in ids))
            if not parts:
                return torch.zeros(0, dtype=torch.int64), torch.zeros(0), None
            return torch.cat(ids), torch.cat(parts), None

        return agree(trainer, r, "the pool scores", score_sampled)

    def _metrics(self, selection: Selection, previous: Selection | None, scores: np.ndarray, n: int) -> dict:
        q10, q50, q90 = np.quantile(scores, [0.1, 0.5, 0.9])
        return {
            "round": float(selection.round),
            "fraction": len(selection) / n,
            "overlap": selection.overlap(previous),
            "score_q10": float(q10),
            "score_q50": float(q50),
            "score_q90": float(q90),
        }

    def _write(self, trainer: Trainer, selection: Selection, ids: np.ndarray, scores: np.ndarray,
               bad_arrays: dict[str, np.ndarray]) -> None:  # fmt: skip
        if self.save_dir == "":
            return
        directory = Path(self.save_dir) if self.save_dir is not None else Path(trainer.log_dir or ".") / "selection"
        write_round_file(
            directory / f"round_{selection.round:04d}.npz", ids, scores, selection.contains(ids),
            round=selection.round, method=selection.method, fraction=self.fraction, **bad_arrays,
        )  # fmt: skip

    # -- state -------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        selection = None
        if self.selection is not None:
            sel = self.selection
            selection = {
                "ids": torch.as_tensor(sel.ids),
                "indices": torch.as_tensor(sel.indices),
                "weights": None if sel.weights is None else torch.as_tensor(sel.weights),
                "round": sel.round,
                "method": sel.method,
                "num_candidates": sel.num_candidates,
            }
        return {
            "round": self.round,
            "seed": self.seed,
            "selection": selection,
            "last_step": self.last_step,
            "last_epoch": self.last_epoch,
            "history": list(self.history),
            "scorer": self.scorer.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.round = int(state_dict["round"])
        saved_seed = int(state_dict["seed"])
        if saved_seed != self.seed:  # the constructor's seed is the configuration; the checkpoint's is history
            rank_zero_warn(
                f"DataSelectionCallback: the checkpoint's selection seed is {saved_seed}, this callback's is "
                f"{self.seed}; the resumed rounds use {self.seed}, so they differ from the interrupted run's. Pass "
                f"seed={saved_seed} to resume it exactly."
            )
        self.last_step = int(state_dict["last_step"])
        self.last_epoch = int(state_dict["last_epoch"])
        self.history = list(state_dict.get("history", []))
        self.scorer.load_state_dict(state_dict.get("scorer", {}))
        sel = state_dict.get("selection")
        if sel is not None:
            self.selection = Selection.from_state_dict(
                {k: (v.numpy() if isinstance(v, Tensor) else v) for k, v in sel.items()}
            )
        self._restored = True


def _is_last_epoch(trainer: Trainer) -> bool:
    """True when training stops after this epoch (a selection now would never be trained on)."""
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
        return True
    return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
