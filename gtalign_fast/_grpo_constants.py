"""Constants of the ``grpo_loss`` kernels, defined once for Python and the Triton kernels.

The C++ CPU and CUDA kernels read the same values from ``csrc/grpo_loss_common.h``;
``tests/test_constants.py`` checks that the two agree. This module imports only the standard
library, so the op's Python code can use it without Triton.
"""

from __future__ import annotations

# Columns of row_stats [B, NUM_STATS], one row per sequence, written by the forward kernel and read
# by its finalize step and by the backward.
STAT_LOSS_SUM = 0  # sum_t mask * (pg + beta * kl)
STAT_TOKENS = 1  # sum_t mask
STAT_LOW = 2  # low-clipped tokens (or, with per-row metrics, the row's 0/1 indicator)
STAT_HIGH = 3  # high-clipped tokens (or indicator)
STAT_REGION = 4  # either (or indicator)
STAT_KL_SUM = 5  # sum_t mask * kl
STAT_RATIO_SUM = 6  # sum_t mask * r (or, with per-row metrics, the row's ratio)
STAT_SEQ_GRAD = 7  # sequence level: d(sum_t mask * pg) / d logp_t for each masked token; else 0
NUM_STATS = 8

# Aggregation modes of the finalize step: the weight w_b of row b's loss sum (the mapping from
# loss_type is gtalign_fast._grpo_loss.aggregation).
MODE_SEQ_MEAN = 0  # w_b = 1 / (B * max(n_b, 1))
MODE_TOKEN_MEAN = 1  # w_b = 1 / max(sum_b n_b, 1)
MODE_NORMALISER_TENSOR = 2  # w_b = 1 / num_items (a device tensor: no host sync)
MODE_CONSTANT = 3  # w_b = const_weight

# The metrics vector [NUM_METRICS] the finalize step writes, in this order.
METRIC_NAMES = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl", "ratio_mean")
METRIC_LOW, METRIC_HIGH, METRIC_REGION, METRIC_KL, METRIC_RATIO = range(len(METRIC_NAMES))
NUM_METRICS = len(METRIC_NAMES)

# Clamp limits (verl's): log-ratios to [-20, 20] before exp; verl's low_var_kl bound on the k3 value,
# which the ops apply only when asked (their kl_clamp option; verl's plugin passes KL_LIMIT).
LOG_RATIO_LIMIT = 20.0
KL_LIMIT = 10.0
