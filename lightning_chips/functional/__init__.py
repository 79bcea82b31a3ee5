"""Pure tensor math (no Lightning): end-point gradients, sketches, CHIPS, baselines."""

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
from lightning_chips.functional.endpoint import (
    BankStats,
    EndPointDirection,
    EndPointGrads,
    bank_loss,
    bank_stats,
    endpoint_per_sample_grads,
)
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
]
