"""Constants of the ``token_logprobs`` kernels, defined once for Python and the Triton kernels.

The C++ CPU and CUDA kernels read the same values from ``csrc/token_logprobs_common.h``;
``tests/test_constants.py`` checks that the two agree. Standard library only, like
``_grpo_constants``.
"""

from __future__ import annotations

# Columns of the per-row stats [N, NUM_SOFTMAX_STATS] the forward saves for the backward (with y = z / T).
STAT_ROW_MAX = 0  # m = max_v y
STAT_LOG_SUM = 1  # log sum_v exp(y - m); m + log s is never formed (see kernels/token_logprobs.py)
NUM_SOFTMAX_STATS = 2  # C++: token_logprobs::kNumStats
