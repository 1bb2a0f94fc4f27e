"""A fresh machine with today's dependencies: the repository's folders never shadow a package that
a dependency imports.

transformers (>= 5.25) imports Hugging Face's ``kernels`` package; our Triton sources live in a
top-level ``kernels/`` folder. Whenever the repository root is on ``sys.path`` (``python -m pytest``
run from the root, ``bench/run.py``, the examples, a ``python`` started in the checkout) that folder
must not be what ``import kernels`` finds. Each check starts a fresh interpreter the way a user would.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_KERNELS = os.path.join(ROOT, "kernels")

# Prints where `kernels` resolves: "absent", or its file and search path.
WHERE_IS_KERNELS = """
import importlib.util, json
spec = importlib.util.find_spec("kernels")
if spec is None:
    print(json.dumps(None))
else:
    print(json.dumps({"origin": spec.origin, "locations": list(spec.submodule_search_locations or [])}))
"""


def _run(args, cwd=ROOT, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _assert_not_ours(output: str) -> None:
    import json

    found = json.loads(output.strip().splitlines()[-1])
    if found is None:
        return
    paths = [found["origin"] or ""] + found["locations"]
    ours = [p for p in paths if os.path.realpath(p).startswith(os.path.realpath(OUR_KERNELS))]
    assert not ours, f"`import kernels` resolves to the repository's folder: {found}"


def test_kernels_from_repository_root_is_not_our_folder():
    """`python -c` in the root puts the root first on sys.path (as `python -m pytest` does)."""
    result = _run([sys.executable, "-c", WHERE_IS_KERNELS])
    assert result.returncode == 0, result.stderr
    _assert_not_ours(result.stdout)


def test_kernels_with_root_inserted_like_the_scripts_is_not_our_folder():
    """bench/run.py and the examples insert the root at the front of sys.path."""
    code = f"import sys; sys.path.insert(0, {ROOT!r})\n" + WHERE_IS_KERNELS
    result = _run([sys.executable, "-c", code], cwd=os.path.join(ROOT, "examples"))
    assert result.returncode == 0, result.stderr
    _assert_not_ours(result.stdout)


def test_trl_grpo_trainer_imports_from_repository_root():
    """`import trl.trainer.grpo_trainer` reaches transformers' hub-kernel integration."""
    pytest.importorskip("trl")
    result = _run([sys.executable, "-c", "import trl.trainer.grpo_trainer; print('ok')"])
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_our_triton_kernels_still_import_as_gtalign_fast_kernels():
    code = (
        "import os; os.environ.setdefault('TRITON_INTERPRET', '1')\n"
        "import gtalign_fast.kernels.grpo_loss as m, gtalign_fast.kernels.sample as s\n"
        "print(m.__file__); print(s.__file__)"
    )
    result = _run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr[-3000:]
    for line in result.stdout.split():
        assert os.path.basename(os.path.dirname(line)) == "kernels", line


def test_wheel_carries_the_triton_kernels(tmp_path):
    """A wheel built from the checkout holds gtalign_fast/kernels/*.py (no editable install to lean on)."""
    pytest.importorskip("setuptools")
    import zipfile

    env_no_ext = {**os.environ, "GTALIGN_FAST_NO_EXT": "1"}
    env_no_ext.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        cwd=tmp_path, env=env_no_ext, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("gtalign_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"gtalign_fast/kernels/{name}" for name in os.listdir(OUR_KERNELS) if name.endswith(".py")}
    assert expected and expected <= names, sorted(expected - names)
    assert "gtalign_fast/kernels/__init__.py" in names
    assert not any(name.startswith("kernels/") for name in names)
