"""CHIPS scoring throughput against a forward-only pass and against dattri's TRAK and TracIn, in one run.

Everything runs in one process over the same built-in pairs (``TwoDomainPairs``, CLIP-normalised, at the model's
image size), with the same model, batch size and threads, and repetitions alternate between the methods (the
order is reversed on every other repetition); the table reports medians.

* **forward-only**: the image and text towers over every pool + target pair (what any selection method pays),
  through our feature pass, which cuts each batch's tokens after its longest caption (open_clip's causal text
  tower never reads the padding: the features are unchanged, ``tests/test_adapters.py``). open_clip's own
  ``encode_image`` + ``encode_text`` over the full context is timed beside it for reference.
* **CHIPS**: that same feature pass, then ``CHIPS.prepare`` (bank, target gradient, curvature, sketched solve,
  k = 512) and the streaming ``CHIPS.score`` over the pool.
* **dattri TRAK / TracIn**: dattri 0.3.0 restricted to the end-point parameters (``visual.proj``,
  ``text_projection``, ``logit_scale``) by ``requires_grad=False`` on every other parameter (not with
  ``layer_name``, which rebuilds the full parameter vector on every call). dattri runs its own per-sample
  gradients (``vmap(grad(loss))``) on the raw images and tokens through the towers, with the same per-sample bank
  loss as the end-point path (docs/methods.md, CHIPS: the pool's negative bank, each pool pair excluded from its own
  negatives). TRAK projects to 512 dims; TracIn runs exact (identity projection) and projected to 512. The bank
  embeddings the loss needs are computed before the clock starts (their cost, a forward pass over the bank pairs,
  is reported separately), which favours dattri. dattri gets the tokens as a user passes them (the full
  context), and once more pre-cut to the longest caption of the pool and target (the same saving, given to it by
  hand): both rows are reported.
* **peak memory**: CHIPS scoring at N and 4N pool pairs, each in a fresh subprocess: prepare on a fixed sample of
  the pool, then stream the whole pool from the data loader; the peak RSS growth over the settled process.

    python benchmarks/throughput.py                                 # ViT-B-32 (random weights), 64 + 16 pairs
    python benchmarks/throughput.py --quick                         # tiny ViT, seconds
    python benchmarks/throughput.py --repeats 5 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's per-batch progress bars

import open_clip  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset, TensorDataset  # noqa: E402

from lightning_chips.adapters import CLIPAdapter, EndPoint, resolve_adapter  # noqa: E402
from lightning_chips.data import TwoDomainPairs, clip_normalize  # noqa: E402
from lightning_chips.features import PairFeatures, extract_features, iter_features  # noqa: E402
from lightning_chips.functional import bank_loss, bank_stats  # noqa: E402
from lightning_chips.functional.bank import NegativeBank, endpoint_per_sample_grads, make_bank  # noqa: E402
from lightning_chips.functional.influence import grad_dot  # noqa: E402
from lightning_chips.scoring import CHIPS  # noqa: E402

TINY = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32,
        "layers": 2,
        "width": 64,
        "head_width": 32,
        "patch_size": 8,
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}
SKETCH = 512
SECTION = "## Throughput vs dattri"
METHODS = ("forward", "forward_full", "chips", "trak", "trak_trimmed", "tracin_exact", "tracin_proj")
LABELS = {
    "forward": "forward-only (image + text towers, our feature pass)",
    "forward_full": "open_clip encode_image + encode_text (full 77-token context)",
    "chips": f"CHIPS (feature pass + prepare + streaming score, k = {SKETCH})",
    "trak": f"dattri TRAK, end point, projected to {SKETCH}",
    "trak_trimmed": "dattri TRAK, as above, tokens pre-cut to the longest caption",
    "tracin_exact": "dattri TracIn, end point, exact",
    "tracin_proj": f"dattri TracIn, end point, projected to {SKETCH}",
}


# -- setup ---------------------------------------------------------------------------------------------------------
def make_model(name: str) -> torch.nn.Module:
    """An open_clip model with random weights (nothing is downloaded); ``"tiny-vit"`` is a 3.4 M-parameter ViT."""
    torch.manual_seed(0)
    if name == "tiny-vit":
        return open_clip.CLIP(**TINY)
    return open_clip.create_model(name, pretrained=None)


def datasets(model: torch.nn.Module, pool: int, target: int) -> tuple[TwoDomainPairs, TwoDomainPairs]:
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    common = dict(image_size=int(size), tokenizer=tokenizer, transform=clip_normalize())
    return (
        TwoDomainPairs(pool, target_fraction=0.2, **common),
        TwoDomainPairs(target, target_fraction=1.0, split="val", **common),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Setup:
    """The model, the pre-collated pool and target batches, and the bank the per-sample loss uses."""

    name: str
    model: torch.nn.Module
    adapter: CLIPAdapter
    device: torch.device
    batch_size: int
    pool: list[dict]
    target: list[dict]
    pool_ids: torch.Tensor
    bank_image: torch.Tensor | None = None  # [M, e] normalised bank embeddings (constants of the loss)
    bank_text: torch.Tensor | None = None
    bank_ids: torch.Tensor | None = None
    trak_damping: float = 0.0
    extras: dict = field(default_factory=dict)


def build(
    name: str,
    pool: int,
    target: int,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> Setup:
    """Model, data (rendered and collated up front, so data loading is outside every timing) and the bank."""
    device = torch.device(device)
    model = make_model(name).to(device).eval()
    pool_ds, target_ds = datasets(model, pool, target)

    def collate(ds: TwoDomainPairs) -> list[dict]:
        return [
            {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in DataLoader(ds, batch_size)
        ]

    setup = Setup(
        name,
        model,
        resolve_adapter(model),
        device,
        batch_size,
        collate(pool_ds),
        collate(target_ds),
        torch.tensor(pool_ds.ids, dtype=torch.int64),
    )
    # The bank of the per-sample loss, exactly as CHIPS.prepare draws it (bank_size 1024, seed 0), kept in float32
    # for dattri. Its cost (a forward pass over the pool the bank is drawn from) is not charged to dattri; it is
    # re-timed warm after the repetitions (`loss_bank`).
    feats, bank = loss_bank(setup)
    ep = setup.adapter.endpoint().detach()
    setup.extras["bank_pairs"] = len(bank.ids)
    setup.bank_image, setup.bank_text, setup.bank_ids = bank.image, bank.text, bank.ids
    # TRAK's damping with CHIPS's rule (1e-3 x trace / k) in dattri's scaling (gradients / sqrt(dim theta)), from
    # the closed-form gradients; dattri's default 0 makes the rank-N kernel singular. It does not affect the time.
    with torch.no_grad():
        g = endpoint_per_sample_grads(
            feats.image.double(),
            feats.text.double(),
            ep.to(torch.float64),
            bank.image.double(),
            bank.text.double(),
            exclude=feats.ids[:, None] == bank.ids[None, :].cpu(),
        )
        setup.trak_damping = 1e-3 * float(g.sq_norms().sum()) / ep.num_parameters / SKETCH
    setup.extras["pool_features"] = feats
    return setup


def loss_bank(setup: Setup) -> tuple[PairFeatures, NegativeBank]:
    """The pool's features and the negative bank of the per-sample loss (what dattri's loss needs up front)."""
    with torch.no_grad():
        feats = extract_features(setup.adapter, setup.pool, device=setup.device)
        d = setup.device
        ep = setup.adapter.endpoint().detach()
        bank = make_bank(ep, feats.image.to(d), feats.text.to(d), feats.ids.to(d), bank_size=1024, seed=0)
    return feats, bank


# -- the timed passes ------------------------------------------------------------------------------------------------
def forward_only(setup: Setup) -> dict:
    with torch.no_grad():
        extract_features(setup.adapter, setup.target, device=setup.device)
        extract_features(setup.adapter, setup.pool, device=setup.device)
    return {}


def forward_full(setup: Setup) -> dict:
    """open_clip's own ``encode_image`` / ``encode_text`` (every text position of the context) over the same pairs."""
    with torch.no_grad():
        for batch in (*setup.target, *setup.pool):
            setup.model.encode_image(batch["image"])
            setup.model.encode_text(batch["text"])
    return {}


def chips_pass(setup: Setup) -> dict:
    """The forward pass + prepare + streaming score; returns the scores and the time of each stage."""
    device = setup.device
    t0 = time.perf_counter()
    with torch.no_grad():
        target_f = extract_features(setup.adapter, setup.target, device=device)
        pool_f = extract_features(setup.adapter, setup.pool, device=device)
        _sync(device)
        t1 = time.perf_counter()
        scorer = CHIPS(sketch_dim=SKETCH, components="paper")  # paper defaults: alpha 0.7, bank 1024, curvature 8192
        scorer.prepare(setup.adapter.endpoint(), target_f, pool_f)
        _sync(device)
        t2 = time.perf_counter()
        scores = torch.cat([scorer.score(batch.to(device)) for batch in pool_f.batches(setup.batch_size)])
        _sync(device)
        t3 = time.perf_counter()
    return {
        "scores": scores.cpu(),
        "stages": (t1 - t0, t2 - t1, t3 - t2),
        "summary": scorer.summary(),
    }


def _raw(batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.cat([b["image"] for b in batches]),
        torch.cat([b["text"] for b in batches]),
        torch.cat([torch.as_tensor(b["id"], dtype=torch.int64) for b in batches]),
    )


def dattri_task(setup: Setup, trim: bool = False):
    """dattri's task on the full model with only the end point trainable, and the raw-data loaders.

    The loss of one sample (image, tokens, bank-exclusion row) runs both towers on the raw inputs and then the
    library's bank loss with the end point taken from dattri's parameters: the loss CHIPS differentiates in
    closed form. With ``trim``, every token row is cut to the longest caption of the pool and target (the
    padding the causal text tower never reads; one length for all, as ``vmap`` needs): the saving our feature
    pass makes per batch, given to dattri too. Returns ``(task, pool_loader, target_loader, correct_probability)``.
    """
    from dattri.task import AttributionTask

    model, adapter = setup.model, setup.adapter
    ep = adapter.endpoint()
    by_id = {id(p): n for n, p in model.named_parameters()}
    if any(id(t) not in by_id for t in ep.tensors()):
        raise NotImplementedError(
            "The dattri comparison needs end-point tensors that are the model's own parameters "
            "(an open_clip ViT with bias-free projection Parameters)."
        )
    image_name, text_name, scale_name = (
        by_id[id(ep.image_proj)],
        by_id[id(ep.text_proj)],
        by_id[id(ep.logit_scale)],
    )
    for n, p in model.named_parameters():
        p.requires_grad_(n in (image_name, text_name, scale_name))
    bank_x, bank_y = setup.bank_image, setup.bank_text

    def endpoint(params: dict) -> EndPoint:
        return EndPoint(params[image_name], params[text_name], params[scale_name])

    def loss_func(params: dict, data: tuple) -> torch.Tensor:
        image, tokens, exclude = data
        h_v = adapter.image_features(image[None])
        h_t = adapter.text_features(tokens[None])
        return bank_loss(h_v, h_t, endpoint(params), bank_x, bank_y, exclude=exclude[None])[0]

    def correct_probability(params: dict, data: tuple) -> torch.Tensor:  # dattri vmaps it over single samples
        image, tokens, exclude = data
        stats = bank_stats(
            adapter.image_features(image[None]),
            adapter.text_features(tokens[None]),
            endpoint(params),
            bank_x,
            bank_y,
            exclude=exclude[None],
        )
        return 0.5 * (stats.p[0, 0] + stats.q[0, 0])

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    pool_image, pool_tokens, pool_ids = _raw(setup.pool)
    target_image, target_tokens, _ = _raw(setup.target)
    if trim:
        length = adapter.trim_tokens(torch.cat([pool_tokens, target_tokens])).shape[1]
        pool_tokens, target_tokens = pool_tokens[:, :length].contiguous(), target_tokens[:, :length].contiguous()
    exclude = pool_ids.to(setup.device)[:, None] == setup.bank_ids[None, :]
    none = torch.zeros(len(target_image), len(setup.bank_ids), dtype=torch.bool, device=setup.device)
    bs = setup.batch_size
    pool_loader = DataLoader(TensorDataset(pool_image, pool_tokens, exclude), batch_size=bs, shuffle=False)
    target_loader = DataLoader(TensorDataset(target_image, target_tokens, none), batch_size=bs, shuffle=False)
    return task, pool_loader, target_loader, correct_probability


def _projector(setup: Setup, proj_type: str) -> dict:
    # dattri keeps `projector_kwargs` in a module-level dict that every attributor updates in place: pass all keys.
    device = "cuda" if setup.device.type == "cuda" else "cpu"
    return {
        "proj_dim": SKETCH,
        "proj_max_batch_size": 32,
        "proj_seed": 0,
        "device": device,
        "proj_type": proj_type,
    }


def dattri_trak(setup: Setup, trim: bool = False) -> dict:
    from dattri.algorithm.trak import TRAKAttributor

    task, pool, target, p_corr = dattri_task(setup, trim=trim)
    attributor = TRAKAttributor(
        task=task,
        correct_probability_func=p_corr,
        projector_kwargs=_projector(setup, "normal"),
        device=str(setup.device),
        regularization=setup.trak_damping,
    )
    attributor.cache(pool)
    scores = attributor.attribute(target)  # [N_pool, T]
    return {"scores": scores.mean(1).cpu()}


def dattri_trak_trimmed(setup: Setup) -> dict:
    return dattri_trak(setup, trim=True)


def _dattri_tracin(setup: Setup, proj_type: str) -> dict:
    from dattri.algorithm.tracin import TracInAttributor

    task, pool, target, _ = dattri_task(setup)
    attributor = TracInAttributor(
        task=task,
        weight_list=torch.ones(1),
        normalized_grad=False,
        projector_kwargs=_projector(setup, proj_type),
        device=str(setup.device),
    )
    return {"scores": attributor.attribute(pool, target).mean(1).cpu()}


def dattri_tracin_exact(setup: Setup) -> dict:
    return _dattri_tracin(setup, "identity")


def dattri_tracin_projected(setup: Setup) -> dict:
    return _dattri_tracin(setup, "normal")


PASSES: dict[str, Callable[[Setup], dict]] = {
    "forward": forward_only,
    "forward_full": forward_full,
    "chips": chips_pass,
    "trak": dattri_trak,
    "trak_trimmed": dattri_trak_trimmed,
    "tracin_exact": dattri_tracin_exact,
    "tracin_proj": dattri_tracin_projected,
}


def time_methods(setup: Setup, repeats: int, methods: tuple[str, ...] = METHODS, warmup: bool = True) -> dict:
    """Median seconds of each pass over ``repeats`` alternating repetitions (reversed order every other one).

    Wall-clock medians are the result; the medians of the process CPU time (all threads) are kept under ``"cpu"``
    as a cross-check that is less sensitive to other processes on a shared machine.
    """
    timings: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    outputs: dict[str, dict] = {}
    if warmup:
        for m in methods:
            outputs[m] = PASSES[m](setup)
    stages = []
    for r in range(repeats):
        for m in methods if r % 2 == 0 else tuple(reversed(methods)):
            gc.collect()
            _sync(setup.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            out = PASSES[m](setup)
            _sync(setup.device)
            timings[m].append(time.perf_counter() - start)
            cpu[m].append(time.process_time() - start_cpu)
            outputs[m] = out
            if m == "chips":
                stages.append(out["stages"])
    result = {m: statistics.median(v) for m, v in timings.items()}
    result["all"] = timings
    result["cpu"] = {m: statistics.median(v) for m, v in cpu.items()}
    if stages:
        result["chips_stages"] = tuple(statistics.median(s[i] for s in stages) for i in range(3))
    result["outputs"] = outputs
    return result


def _timed(fn: Callable[[Setup], object], setup: Setup) -> float:
    _sync(setup.device)
    start = time.perf_counter()
    fn(setup)
    _sync(setup.device)
    return time.perf_counter() - start


def agreement(setup: Setup, outputs: dict) -> dict:
    """Spearman of dattri's exact TracIn with the closed-form Dot on the same loss (a check that both
    differentiate the same per-sample loss), and of CHIPS with dattri's TRAK (different methods: information)."""
    from scipy.stats import spearmanr

    feats: PairFeatures = setup.extras["pool_features"]
    target = extract_features(setup.adapter, setup.target, device=setup.device)
    dot = grad_dot(
        feats.image.double(),
        feats.text.double(),
        target.image.double(),
        target.text.double(),
        setup.adapter.endpoint().detach().to(torch.float64),
        bank_size=1024,
    )
    out = {}
    if "tracin_exact" in outputs:
        out["tracin_exact_vs_dot"] = float(spearmanr(outputs["tracin_exact"]["scores"].numpy(), dot.numpy())[0])
    if "tracin_proj" in outputs:
        out["tracin_proj_vs_dot"] = float(spearmanr(outputs["tracin_proj"]["scores"].numpy(), dot.numpy())[0])
    if "trak" in outputs and "trak_trimmed" in outputs:
        out["trak_vs_trak_trimmed"] = float(
            spearmanr(outputs["trak"]["scores"].numpy(), outputs["trak_trimmed"]["scores"].numpy())[0]
        )
    if "chips" in outputs and "trak" in outputs:
        out["chips_vs_trak"] = float(
            spearmanr(outputs["chips"]["scores"].numpy(), outputs["trak"]["scores"].numpy())[0]
        )
    return out


# -- peak memory ----------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(name: str, pool: int, sample: int, target: int, batch_size: int, device: str = "cpu") -> dict:
    """Peak RSS growth of CHIPS scoring over ``pool`` pairs streamed from the data loader (run in a fresh process).

    ``CHIPS.prepare`` runs on the first ``sample`` pool pairs (the bank and curvature sample: their size does not
    depend on the pool), then every pool pair is rendered, embedded and scored batch by batch; only the ``[N]``
    scores are kept. The model, the target features and one warm-up batch are in place before the mark is reset.
    """
    device = torch.device(device)
    model = make_model(name).to(device).eval()
    adapter = resolve_adapter(model)
    pool_ds, target_ds = datasets(model, pool, target)
    target_f = extract_features(adapter, DataLoader(target_ds, batch_size), device=device)
    scorer = CHIPS(sketch_dim=SKETCH, components="paper")
    warm = extract_features(
        adapter,
        DataLoader(Subset(pool_ds, range(min(batch_size, pool))), batch_size),
        device=device,
    )
    scorer.prepare(adapter.endpoint(), target_f, warm)  # warm-up: allocator and kernels
    scorer.score(warm)
    del warm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    exact = _reset_peak()
    base = _status_kib("VmRSS") if exact else _status_kib("VmHWM")
    start = time.perf_counter()
    sample_f = extract_features(
        adapter,
        DataLoader(Subset(pool_ds, range(min(sample, pool))), batch_size),
        device=device,
    )
    scorer.prepare(adapter.endpoint(), target_f, sample_f)
    del sample_f
    scores = [scorer.score(f) for f in iter_features(adapter, DataLoader(pool_ds, batch_size), device=device)]
    scores = torch.cat(scores)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    out = {
        "pool": pool,
        "sample": min(sample, pool),
        "peak_growth_mib": (peak - base) / 1024,
        "base_rss_mib": base / 1024,
        "scores_kib": scores.numel() * scores.element_size() / 1024,
        "seconds": seconds,
        "exact_reset": exact,
    }
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


# glibc's dynamic mmap threshold makes the peak RSS of the same job vary by +-20 % from run to run (measured: 86 to
# 126 MiB for one configuration, not monotone in N). A static threshold returns every block >= 64 KiB to the OS
# when freed, so the peak follows the live tensors: flat to 0.1 MiB from N = 256 to 4,096 where the default varied.
STATIC_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measure_memory(
    name: str,
    pools: list[int],
    sample: int,
    target: int,
    batch_size: int,
    device: str,
    static_malloc: bool = True,
) -> list[dict]:
    """:func:`memory_probe` for each pool size, each in a fresh interpreter (a clean peak).

    ``static_malloc`` runs the probes with a static glibc mmap threshold (:data:`STATIC_MALLOC`) so that the peak
    RSS measures live memory rather than allocator fragmentation.
    """
    env = {**os.environ, **(STATIC_MALLOC if static_malloc else {})}
    rows = []
    for n in pools:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-probe",
            str(n),
            "--memory-sample",
            str(sample),
            "--model",
            name,
            "--target",
            str(target),
            "--batch-size",
            str(batch_size),
            "--device",
            device,
            "--threads",
            str(torch.get_num_threads()),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe at N={n} failed:\n{done.stderr[-4000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


# -- report ---------------------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def table(result: dict) -> str:
    t = result["times"]
    fwd, chips = t["forward"], t["chips"]
    c = t.get("cpu", {})
    lines = [
        "| method | wall (s), median | min - max | x forward-only | CHIPS speedup | CPU (s) | CPU x forward-only |",
        "|---|---|---|---|---|---|---|",
    ]
    every = t.get("all", {})
    for m in METHODS:
        if m not in t:
            continue
        speed = "" if m in ("forward", "forward_full", "chips") else f"{t[m] / chips:.2f} x"
        cpu = f"{c[m]:.2f} | {c[m] / c['forward']:.3f}" if m in c and "forward" in c else " | "
        spread = f"{min(every[m]):.2f} - {max(every[m]):.2f}" if every.get(m) else ""
        lines.append(f"| {LABELS[m]} | {t[m]:.2f} | {spread} | {t[m] / fwd:.3f} | {speed} | {cpu} |")
    stages = t.get("chips_stages")
    notes = []
    if stages:
        notes.append(
            f"CHIPS stages (medians): features {stages[0]:.2f} s, prepare {stages[1]:.3f} s "
            f"({stages[1] / max(sum(stages), 1e-12):.1%} of CHIPS), score {stages[2]:.3f} s."
        )
    notes.append(
        f"Bank of dattri's loss ({result['bank_pairs']} pairs; forward over the pool, warm, not in dattri's times): "
        f"{result['bank_s']:.2f} s."
    )
    out = "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"
    if result.get("memory"):
        out += (
            "\n| pool pairs (N) | prepare sample | peak RSS growth (MiB) | score array (KiB) | wall (s) |\n"
            "|---|---|---|---|---|\n"
        )
        for r in result["memory"]:
            out += (
                f"| {r['pool']} | {r['sample']} | {r['peak_growth_mib']:.1f} | {r['scores_kib']:.2f} | "
                f"{r['seconds']:.1f} |\n"
            )
    return out


def verdict(result: dict) -> str:
    t = result["times"]
    parts = []
    ratio = t["chips"] / t["forward"]
    parts.append(f"CHIPS / forward-only = {ratio:.3f} ({'meets' if ratio <= 1.10 else 'misses'} the 1.10 x target)")
    stages = t.get("chips_stages")
    if stages and ratio > 1.10:  # say where the time goes
        parts.append(
            f"CHIPS's time beyond the feature pass is prepare {stages[1]:.2f} s (once per round: bank, target "
            f"gradient, curvature atoms and their sketch; it does not grow with the pool, so its share falls as "
            f"the pool or the per-pair forward cost grows) and streaming score {stages[2]:.2f} s"
        )
    if "trak_trimmed" in t:  # the headline: equal inputs (the same cut tokens for both)
        speed = t["trak_trimmed"] / t["chips"]
        parts.append(f"dattri TRAK / CHIPS on equal inputs = {speed:.2f} "
                     f"({'meets' if speed >= 3.0 else 'misses'} the 3 x target)")  # fmt: skip
    if "trak" in t:
        parts.append(f"with dattri given the full-context tokens a user passes: {t['trak'] / t['chips']:.2f}")
    if "forward_full" in t:
        parts.append(f"CHIPS / open_clip's full-context forward = {t['chips'] / t['forward_full']:.3f}")
    mem = result.get("memory") or []
    if len(mem) >= 2:
        parts.append(
            f"peak RSS growth {mem[0]['peak_growth_mib']:.1f} MiB at N = {mem[0]['pool']} vs "
            f"{mem[-1]['peak_growth_mib']:.1f} MiB at N = {mem[-1]['pool']}"
        )
    return "; ".join(parts) + "."


def section(result: dict) -> str:
    a = result["args"]
    agree = result.get("agreement", {})
    agree_txt = ", ".join(f"{k} {v:.3f}" for k, v in agree.items())
    return (
        f"{heading(a)}\n\n"
        "`benchmarks/throughput.py`: one process, the same built-in pairs (`TwoDomainPairs`, CLIP-normalised, at the\n"
        "model's image size), the same model, batch size and threads; repetitions alternate between the methods\n"
        "(order reversed every other repetition) after one warm-up of each; medians. Forward-only = image and text\n"
        "towers over every pool + target pair, with each batch's tokens cut after its longest caption (the padding\n"
        "open_clip's causal text tower never reads; same features); open_clip's own full-context forward is timed\n"
        "beside it. CHIPS = that feature pass + `CHIPS.prepare` + streaming `CHIPS.score`\n"
        f"(k = {SKETCH}, alpha = 0.7, bank 1024, curvature 8192, float64). dattri TRAK and TracIn are restricted\n"
        "to the end point (`visual.proj`, `text_projection`, `logit_scale`) with `requires_grad=False` elsewhere and\n"
        "compute their own per-sample gradients (`vmap(grad)`) on the raw images and tokens through the towers, with\n"
        "the same per-sample bank loss (docs/methods.md); the bank's embeddings are computed before their clock\n"
        "starts; dattri gets the full-context tokens a user passes, and (second TRAK row) the tokens pre-cut to\n"
        "the longest caption of the pool and target, the saving of our feature pass given to it by hand.\n"
        'TRAK and TracIn "projected" use dattri\'s dense Gaussian projection to 512 dims; TracIn exact uses the\n'
        "identity projection. What dattri spends beyond a forward pass: its per-sample `vmap` runs the attention\n"
        "kernels one sample at a time (PyTorch has no batching rule for them, and warns so), TRAK runs a second\n"
        "per-sample pass for its out-to-loss term, and the projections multiply every gradient by a dense\n"
        "Gaussian matrix. Peak memory: CHIPS prepared on a fixed pool sample, then streaming the whole pool from\n"
        "the data loader, in a fresh process per N; peak RSS (VmHWM, reset before the scoring) minus the RSS then,\n"
        + (
            "with a static glibc mmap threshold (`MALLOC_MMAP_THRESHOLD_=65536`; the default dynamic threshold adds\n"
            "+-20 % of allocator noise to the peak).\n\n"
            if result.get("static_malloc", True)
            else "with glibc's default allocator settings.\n\n"
        )
        + f"Measured {result['date']} on {result['machine']}, {result['device']}, torch {torch.__version__}, "
        f"open_clip {open_clip.__version__}, dattri {result['dattri']}; model {a['model']} (random weights); "
        f"{a['pool']} pool + {a['target']} target pairs (CHIPS's bank {min(1024, a['pool'])} and curvature sample "
        f"{min(8192, a['pool'])} pairs: {'the paper defaults' if a['pool'] >= 8192 else 'capped by the pool'}), "
        f"batch {a['batch_size']}, median of {a['repeats']}; load "
        f"average {result['load_before']} before and {result['load_after']} after; {result['wall_s'] / 60:.1f} min "
        f"in all.\n\n"
        f"    {result['command']}\n\n"
        f"{table(result)}\n"
        f"{verdict(result)}\n"
        + (f"Score agreement (Spearman over the pool): {agree_txt}.\n" if agree_txt else "")
        + "Wall times of each repetition (s): "
        + "; ".join(f"{m} {', '.join(f'{x:.2f}' for x in v)}" for m, v in result["times"]["all"].items())
        + ".\n"
    )


def heading(args: dict) -> str:
    """The section heading of a run: one section per model and pool size, so runs at several sizes coexist."""
    return f"{SECTION}: {args['model']}, {args['pool']} pool pairs"


def write_section(path: Path, text: str) -> None:
    """Replace the section of ``path`` whose heading is ``text``'s first line (or append it), keeping every other
    section."""
    title = text.splitlines()[0].rstrip()
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == title), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
            len(lines),
        )
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + text + ("\n" + tail if tail else "")
    path.write_text(new)


def run_benchmark(
    model: str,
    pool: int,
    target: int,
    batch_size: int,
    repeats: int,
    device: str = "cpu",
    methods: tuple[str, ...] = METHODS,
    memory: bool = True,
    memory_pool: int | None = None,
    memory_sample: int | None = None,
    static_malloc: bool = True,
) -> dict:
    """The whole benchmark; returns the times (medians), CHIPS stages, agreement and memory rows."""
    load_before = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    wall = time.perf_counter()
    setup = build(model, pool, target, batch_size, device)
    times = time_methods(setup, repeats, methods)
    outputs = times.pop("outputs")
    result = {
        "times": times,
        "bank_s": _timed(loss_bank, setup),
        "bank_pairs": setup.extras["bank_pairs"],
        "dim_theta": setup.adapter.endpoint().num_parameters,
        "chips_summary": outputs.get("chips", {}).get("summary"),
        "agreement": agreement(setup, outputs) if any(m.startswith("tracin") or m == "trak" for m in methods) else {},
    }
    del setup, outputs
    gc.collect()
    if memory:
        n = memory_pool or pool
        result["memory"] = measure_memory(
            model, [n, 4 * n], memory_sample or n, target, batch_size, device, static_malloc=static_malloc
        )
    result["static_malloc"] = static_malloc
    result["wall_s"] = time.perf_counter() - wall
    result["load_before"] = load_before
    result["load_after"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="ViT-B-32",
        help="open_clip model name (random weights) or 'tiny-vit'",
    )
    parser.add_argument("--pool", type=int, default=64, help="pool pairs of the timings")
    parser.add_argument("--target", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="alternating repetitions (min / median / max)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--memory-pool",
        type=int,
        default=None,
        help="N of the peak-memory probes, run at N and 4N (default: 4 batches)",
    )
    parser.add_argument(
        "--memory-sample",
        type=int,
        default=None,
        help="CHIPS.prepare sample of the probes (default: N)",
    )
    parser.add_argument(
        "--default-malloc", action="store_true", help="memory probes with glibc's dynamic mmap threshold (noisier)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny ViT, 32 + 8 pairs, 1 repetition")
    parser.add_argument(
        "--write",
        type=Path,
        default=None,
        help=f"replace/append this run's '{SECTION}: MODEL, N pool pairs' section of this file",
    )
    parser.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_probe is not None:
        sample = args.memory_sample or args.memory_probe
        print(
            json.dumps(
                memory_probe(
                    args.model,
                    args.memory_probe,
                    sample,
                    args.target,
                    args.batch_size,
                    args.device,
                )
            )
        )
        return
    if args.quick:
        args.model, args.pool, args.target, args.batch_size, args.repeats = (
            "tiny-vit",
            32,
            8,
            16,
            1,
        )
    if args.memory_pool is None:
        args.memory_pool = 4 * args.batch_size
    import dattri

    result = run_benchmark(
        args.model,
        args.pool,
        args.target,
        args.batch_size,
        args.repeats,
        args.device,
        tuple(args.methods),
        memory=not args.no_memory,
        memory_pool=args.memory_pool,
        memory_sample=args.memory_sample,
        static_malloc=not args.default_malloc,
    )
    device = torch.device(args.device)
    result.update(
        args={k: getattr(args, k) for k in ("model", "pool", "target", "batch_size", "repeats", "memory_pool")},
        date=datetime.date.today().isoformat(),
        machine=machine(),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        dattri=getattr(dattri, "__version__", "0.3.0"),
        command="python " + " ".join([str(Path(sys.argv[0]))] + (sys.argv[1:] if argv is None else argv)),
    )
    print(f"{args.model}: dim(theta) = {result['dim_theta']:,}; {result['chips_summary']}")
    print(table(result))
    print(verdict(result))
    if result["agreement"]:
        print(
            "Spearman:",
            ", ".join(f"{k} {v:.3f}" for k, v in result["agreement"].items()),
        )
    print(
        "all timings:",
        {k: [round(x, 3) for x in v] for k, v in result["times"]["all"].items()},
    )
    print(f"load average before {result['load_before']}, after {result['load_after']}; wall {result['wall_s']:.0f} s")
    if args.write is not None:
        write_section(args.write, section(result))
        print(f"wrote the '{heading(vars(args))}' section of {args.write}")


if __name__ == "__main__":
    main()
