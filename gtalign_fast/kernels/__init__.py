"""Triton kernels of gtalign_fast, one file per op.

Each file holds the ``@triton.jit`` kernels of one op and the functions that launch them on
tensors the caller has already validated and allocated; dispatch, autograd and checks live in
``gtalign_fast``. Under ``TRITON_INTERPRET=1`` (set before import) they run on CPU tensors.

Where the files are: in a source checkout (and an editable install) they live in the repository's
top-level ``kernels/`` folder, which this package adds to its ``__path__``; a wheel copies them next
to this file (``setup.py``). That folder deliberately has no ``__init__.py``: a regular package
named ``kernels`` at the repository root would shadow Hugging Face's ``kernels`` package, which
transformers (>= 5.25) imports, whenever the root is on ``sys.path`` (``python -m pytest``, the
examples, a ``python`` started in the checkout). A folder without ``__init__.py`` is only a
namespace-package candidate, and Python prefers any regular package of that name.
"""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_CHECKOUT_KERNELS = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "kernels")

# A wheel has the kernel files here already; a checkout has them in <root>/kernels/.
if not os.path.exists(os.path.join(_HERE, "grpo_loss.py")) and os.path.isfile(
    os.path.join(_CHECKOUT_KERNELS, "grpo_loss.py")
):
    __path__.append(_CHECKOUT_KERNELS)
