"""Pure tensor math (no Lightning): end-point gradients, sketches, CHIPS, baselines, zero-shot metrics."""

from lightning_chips.functional.bank import BankStats, bank_loss, bank_stats, endpoint_per_sample_grads
from lightning_chips.functional.chips import (
    ChipsArguments,
    ChipsScores,
    ChipsState,
    chips_prepare,
    chips_score_batch,
    chips_scores,
    curvature_atoms,
)
from lightning_chips.functional.clip_powered import clip_powered_scores, clip_powered_select
from lightning_chips.functional.clipcov import clipcov_order, clipcov_select
from lightning_chips.functional.gradients import EndPointDirection, EndPointGrads
from lightning_chips.functional.influence import grad_dot, tracin_scores, trak_scores
from lightning_chips.functional.influence_full import (
    GradientProjection,
    endpoint_parameter_names,
    full_parameter_bank,
    full_parameter_grads,
    full_parameter_influence,
    select_parameters,
)
from lightning_chips.functional.linalg import damped_cholesky_solve, solve_direction
from lightning_chips.functional.plausibility import adapt_endpoint, bank_rank, plausibility_weight
from lightning_chips.functional.quality import clip_score, negclip_loss, negsiglip_loss, normsim
from lightning_chips.functional.sketch import (
    EndPointSketch,
    IdentitySketch,
    KhatriRaoSketch,
    SketchLayout,
    TensorSketch,
    make_sketch,
)
from lightning_chips.functional.zero_shot import retrieval_recall_at_k, zero_shot_accuracy

__all__ = [
    "ChipsArguments",
    "ChipsScores",
    "ChipsState",
    "EndPointSketch",
    "GradientProjection",
    "IdentitySketch",
    "KhatriRaoSketch",
    "SketchLayout",
    "TensorSketch",
    "chips_prepare",
    "clip_powered_scores",
    "clip_powered_select",
    "clip_score",
    "clipcov_order",
    "clipcov_select",
    "grad_dot",
    "tracin_scores",
    "trak_scores",
    "negclip_loss",
    "negsiglip_loss",
    "normsim",
    "chips_score_batch",
    "chips_scores",
    "curvature_atoms",
    "make_sketch",
    "solve_direction",
    "BankStats",
    "EndPointDirection",
    "EndPointGrads",
    "bank_loss",
    "bank_stats",
    "endpoint_per_sample_grads",
    "endpoint_parameter_names",
    "full_parameter_bank",
    "full_parameter_grads",
    "full_parameter_influence",
    "select_parameters",
    "adapt_endpoint",
    "damped_cholesky_solve",
    "bank_rank",
    "plausibility_weight",
    "retrieval_recall_at_k",
    "zero_shot_accuracy",
]

_MOVED_FROM_ENDPOINT = {
    "bank": ("BankStats", "NegativeBank", "bank_loss", "bank_stats", "endpoint_per_sample_grads", "grads_from_stats",
             "make_bank"),
    "gradients": ("EndPointDirection", "EndPointGrads", "through_normalisation"),
    "rounds": ("round_inputs", "subsample"),
}  # fmt: skip


def __getattr__(name: str):
    """``lightning_chips.functional.endpoint``, deprecated: its content now lives in :mod:`.bank` (the bank loss and
    its gradients), :mod:`.gradients` (the factored algebra) and :mod:`.rounds` (round inputs, seeded subsets). The
    attribute returns a module holding the old names; ``import lightning_chips.functional.endpoint`` no longer
    works."""
    if name != "endpoint":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    import types
    import warnings

    warnings.warn(
        "lightning_chips.functional.endpoint is deprecated: import from lightning_chips.functional.bank (bank loss, "
        "NegativeBank, gradients of the bank loss), .gradients (EndPointGrads, EndPointDirection) or .rounds "
        "(round_inputs, subsample).",
        DeprecationWarning,
        stacklevel=2,
    )
    module = types.ModuleType(f"{__name__}.endpoint", __getattr__.__doc__)
    for part, names in _MOVED_FROM_ENDPOINT.items():
        source = importlib.import_module(f"{__name__}.{part}")
        module.__dict__.update({n: getattr(source, n) for n in names})
    module.__all__ = [n for names in _MOVED_FROM_ENDPOINT.values() for n in names]
    return module
