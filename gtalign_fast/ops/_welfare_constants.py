"""Constants of the ``welfare_advantages`` kernels, defined once for Python and the Triton kernel.

The C++ CPU and CUDA kernels read the same values from ``csrc/welfare_advantages_common.h``;
``tests/test_constants.py`` checks that the two agree. Standard library only, like
``_grpo_constants``.
"""

from __future__ import annotations

# Scale modes (the op's ``scale_mode`` argument): what the centred welfare is divided by.
SCALE_GROUP = 0  # the group's std + eps
SCALE_BATCH = 1  # the std of every valid reward of the batch + eps (one grid-wide reduction first)
SCALE_NONE = 2  # nothing: A = W - mean_g

# The public ``scale`` strings and their modes.
SCALES = {"group": SCALE_GROUP, "batch": SCALE_BATCH, "none": SCALE_NONE}
