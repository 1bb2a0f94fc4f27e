"""Constants of the ``grpo_loss`` kernels, defined once for Python and the Triton kernels.

The C++ CPU and CUDA kernels read the same values from ``csrc/grpo_loss_common.h``;
``tests/test_constants.py`` checks that the two agree. This module imports only the standard
library, so the op's Python code can use it without Triton.
"""

from __future__ import annotations

# Columns of row_stats [B, NUM_SEQUENCE_STATS], one row per sequence, written by the forward kernel and read
# by its finalize step and by the backward.
STAT_LOSS_SUM = 0  # sum_t mask * (pg + beta * kl)
STAT_TOKENS = 1  # sum_t mask
STAT_LOW = 2  # low-clipped tokens (or, with per-row metrics, the row's 0/1 indicator)
STAT_HIGH = 3  # high-clipped tokens (or indicator)
STAT_REGION = 4  # either (or indicator)
STAT_KL_SUM = 5  # sum_t mask * kl
STAT_RATIO_SUM = 6  # sum_t mask * r (or, with per-row metrics, the row's ratio)
STAT_SEQ_GRAD = 7  # sequence level: d(sum_t mask * pg) / d logp_t for each masked token; else 0
NUM_SEQUENCE_STATS = 8  # C++: grpo::kNumStats

# The objective's parameters as the kernels take them: one float[] argument of NUM_PARAMS values in this
# order, bools as 0 / 1 (gtalign_fast.ops._grpo_loss.kernel_params builds it; C++: grpo::Param). One list
# costs about half as much to pass to a compiled op as the same values as separate float arguments.
PARAM_BETA = 0
PARAM_EPSILON_LOW = 1
PARAM_EPSILON_HIGH = 2  # loss_type="cispo": the ratio cap itself
PARAM_DELTA = 3  # +inf: no two-sided cap
PARAM_DUAL_CLIP = 4  # 0: no dual clip
PARAM_KL_CLAMP = 5  # +inf: unclamped
PARAM_BIAS_KL = 6  # use_bias_correction_kl
PARAM_SAPO_TAU_POS = 7  # > 0 selects SAPO
PARAM_SAPO_TAU_NEG = 8
PARAM_CISPO = 9
PARAM_VESPO_K_POS = 10
PARAM_VESPO_LAMBDA_POS = 11
PARAM_VESPO_K_NEG = 12
PARAM_VESPO_LAMBDA_NEG = 13
PARAM_VESPO = 14
PARAM_SEQ_LEVEL = 15  # importance_sampling_level="sequence"
NUM_PARAMS = 16

# How each loss_type normalises the row sums S_b = sum_t mask * loss_t (n_b: tokens of row b, N: all
# tokens, L: max_completion_length). The one table from loss type to normaliser: the reference, the
# kernels' aggregation modes and row weights (gtalign_fast.ops._grpo_objective) and the trainer's
# micro-batch shares (MICRO_BATCH_SHARES) all read it.
NORM_ROW_TOKENS = "row_tokens"  # mean_b(S_b / n_b)
NORM_TOKENS = "tokens"  # sum_b S_b / N
NORM_ROWS_LENGTH = "rows_length"  # sum_b S_b / (B * L)
NORM_NUM_ITEMS = "num_items"  # sum_b S_b / num_items_in_batch (default N)
NORM_ROWS = "rows"  # mean_b S_b
NORM_LENGTH = "length"  # sum_b S_b / L
LOSS_NORMALISERS = {
    "grpo": NORM_ROW_TOKENS,
    "bnpo": NORM_TOKENS,
    "dr_grpo": NORM_ROWS_LENGTH,
    "dapo": NORM_NUM_ITEMS,
    "token-mean": NORM_TOKENS,
    "seq-mean-token-mean": NORM_ROW_TOKENS,
    "seq-mean-token-sum": NORM_ROWS,
    "seq-mean-token-sum-norm": NORM_LENGTH,
    "luspo": NORM_ROWS,  # TRL's name for seq-mean-token-sum
    "sapo": NORM_ROW_TOKENS,  # TRL's SAPO objective, aggregated as grpo
    "cispo": NORM_NUM_ITEMS,  # TRL's CISPO objective, aggregated as dapo
    "vespo": NORM_NUM_ITEMS,  # TRL's VESPO objective, aggregated as dapo
}
LOSS_TYPES = tuple(LOSS_NORMALISERS)

# A micro-batch's share of the global loss, by normaliser (the trainer's gradient accumulation):
#   "global_tokens": the op is told the global batch's token count
#   "sequences":     a sum or mean over rows, so a micro-batch weighs rows_micro / rows_global
#   "local_tokens":  a mean over the micro-batch's tokens, averaged over micro-batches (TRL's bnpo)
MICRO_BATCH_SHARES = {
    NORM_ROW_TOKENS: "sequences",
    NORM_TOKENS: "local_tokens",
    NORM_ROWS_LENGTH: "sequences",
    NORM_NUM_ITEMS: "global_tokens",
    NORM_ROWS: "sequences",
    NORM_LENGTH: "sequences",
}

# Aggregation modes of the finalize step: the weight w_b of row b's loss sum (the mapping from
# loss_type is gtalign_fast.ops._grpo_objective.aggregation).
MODE_SEQ_MEAN = 0  # w_b = 1 / (B * max(n_b, 1))
MODE_TOKEN_MEAN = 1  # w_b = 1 / max(sum_b n_b, 1)
MODE_NORMALISER_TENSOR = 2  # w_b = 1 / num_items (a device tensor: no host sync)
MODE_CONSTANT = 3  # w_b = const_weight

# The metrics vector [NUM_METRICS] the finalize step writes, in this order.
METRIC_NAMES = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl", "ratio_mean")
METRIC_LOW, METRIC_HIGH, METRIC_REGION, METRIC_KL, METRIC_RATIO = range(len(METRIC_NAMES))
NUM_METRICS = len(METRIC_NAMES)
# loss_type="vespo" reports TRL's mean Gamma weight in the METRIC_HIGH slot, under TRL's name, and no clip
# ratios or ratio_mean (TRL logs none for it).
VESPO_METRIC = "vespo/phi_seq_mean"

# Clamp limits (verl's): log-ratios to [-20, 20] before exp; verl's low_var_kl bound on the k3 value,
# which the ops apply only when asked (their kl_clamp option; verl's plugin passes KL_LIMIT).
LOG_RATIO_LIMIT = 20.0
KL_LIMIT = 10.0
# TRL's VESPO bounds: the sequence log-weight is clamped to [log(1e-8), 20] (its reference implementation's
# floor, ln 1e-8), and the Gamma decay lambda to >= 1e-4.
VESPO_MIN_LOG_WEIGHT = -18.420680743952367
VESPO_MIN_LAMBDA = 1e-4
