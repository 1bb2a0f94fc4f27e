"""Constants of the ``sample_`` kernels, defined once for Python and the Triton kernel.

The C++ CPU kernel reads the same values from ``csrc/sample_common.h``; ``tests/test_constants.py``
checks that the two agree. Standard library only, like ``_grpo_constants``.
"""

from __future__ import annotations

# The status word the kernels write per row; a row that is not STATUS_OK has no valid draw, and the
# Python side raises. When several apply, the lowest nonzero one is reported.
STATUS_OK = 0
STATUS_BAD_LOGITS = 1  # a NaN or +inf logit (after the temperature)
STATUS_NO_FINITE_LOGIT = 2  # every logit is -inf
STATUS_NO_FINITE_LOGIT_AFTER_BIAS = 3  # every logit is -inf once the biases are added

# The Triton kernel's radix select (kernels/sample.py): digits of RADIX_BITS bits, NUM_BUCKETS per digit.
RADIX_BITS = 4
NUM_BUCKETS = 16
# Columns of the per-chunk partials: statistics (raw max, raw sum, processed max, NaN seen) and the
# draw (best score, its y, its z, kept mass).
NUM_PART_STATS = 4
NUM_PART_DRAW = 4
# Columns of a row's reduced statistics: raw log-sum-exp, processed max, status word (as a float).
NUM_ROW_STATS = 3
