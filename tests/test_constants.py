"""The kernel constants have one value each: the Python modules (read by the Python code and the
Triton kernels) and the C++ headers (read by the CPU and CUDA kernels) must agree.

The headers are parsed with regular expressions, so their enum and constexpr lines keep a simple
form: ``enum Name : type { kA = 0, kB, kC = 3 };`` and ``constexpr type kName = literal;``.
Naming: a Python constant ``NAME`` is the C++ constexpr ``k`` + CamelCase(NAME)
(``LOG_RATIO_LIMIT`` -> ``kLogRatioLimit``; the exceptions: ``CPP_NAMES``); a Python constant of an
enum group (its prefix below) is a member of that C++ enum (``STAT_LOSS_SUM`` -> ``Stat::kLossSum``).
"""

from __future__ import annotations

import os
import re
from types import ModuleType

import pytest
import triton.language as tl

from gtalign_fast.ops import (
    _device_checks,
    _grpo_constants,
    _sample_constants,
    _token_logprobs_constants,
    _welfare_constants,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (Python module, header, {Python prefix: (C++ enum, C++ member prefix)}).
SHARED = [
    (
        _grpo_constants,
        "csrc/grpo_loss_common.h",
        {"STAT_": ("Stat", "k"), "MODE_": ("Mode", "k"), "METRIC_": ("Metric", "kMetric"),
         "PARAM_": ("Param", "kParam")},
    ),
    (_welfare_constants, "csrc/welfare_advantages_common.h", {"SCALE_": ("ScaleMode", "kScale")}),
    (_sample_constants, "csrc/sample_common.h", {"STATUS_": ("Status", "kStatus")}),
    (_token_logprobs_constants, "csrc/token_logprobs_common.h", {"STAT_": ("Stat", "k")}),
]
SHARED_IDS = [os.path.basename(header) for _, header, _ in SHARED]

# The Triton kernel module of each constants module: it must bind the same values as tl.constexpr.
KERNEL_MODULES = {
    _grpo_constants: "grpo_loss",
    _welfare_constants: "welfare_advantages",
    _sample_constants: "sample",
    _token_logprobs_constants: "softmax_grad",  # the stats columns token_logprobs' kernels share
}

_ENUM = re.compile(r"\benum\s+(?:class\s+|struct\s+)?(\w+)\s*(?::\s*[\w:]+\s*)?\{([^}]*)\}\s*;")
_CONSTEXPR = re.compile(r"\bconstexpr\s+(?:const\s+)?[\w:]+\s+(\w+)\s*=\s*([^;]+);")


def _literal(text: str) -> int | float:
    """A C++ integer or floating literal (``3``, ``0x10``, ``20.0f``); ValueError for anything else."""
    text = text.strip()
    try:
        return int(text, 0)
    except ValueError:
        return float(text[:-1] if text[-1:] in "fF" else text)


def parse_header(text: str) -> tuple[dict[str, dict[str, int]], dict[str, int | float]]:
    """``(enums, constexprs)``: ``{enum: {member: value}}`` and ``{name: value}`` of a header."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    enums = {}
    for name, body in _ENUM.findall(text):
        members, value = {}, -1
        for item in filter(None, (part.strip() for part in body.split(","))):
            member, _, literal = (piece.strip() for piece in item.partition("="))
            value = _literal(literal) if literal else value + 1
            members[member] = value
        enums[name] = members
    constexprs = {name: _literal(literal) for name, literal in _CONSTEXPR.findall(text)}
    return enums, constexprs


def python_constants(module: ModuleType) -> dict[str, int | float]:
    """The module's public numeric constants (tuples, dicts and strings are derived data)."""
    return {
        name: value
        for name, value in vars(module).items()
        if name.isupper() and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _camel(name: str) -> str:
    return "".join(word.capitalize() for word in name.split("_"))


# Python constants whose C++ name is not k + CamelCase(NAME): each header keeps its count of stats
# columns as kNumStats inside its own namespace (grpo::, token_logprobs::), where it is unambiguous;
# the Python names say which stats they count, since one file may import both.
CPP_NAMES = {"NUM_SEQUENCE_STATS": "kNumStats", "NUM_SOFTMAX_STATS": "kNumStats"}


def mismatches(constants: dict[str, int | float], header: str, groups: dict[str, tuple[str, str]]) -> list[str]:
    """Every disagreement between the Python constants and a header's text: a constant missing on
    either side, a different value, an int on one side and a float on the other, an enum the
    groups do not name."""
    enums, constexprs = parse_header(header)
    problems = []
    matched_members: set[tuple[str, str]] = set()
    matched_constexprs: set[str] = set()
    for name, value in sorted(constants.items()):
        prefix = next((p for p in groups if name.startswith(p)), None)
        if prefix is not None:
            enum, member_prefix = groups[prefix]
            cpp_name = member_prefix + _camel(name[len(prefix):])
            cpp_value = enums.get(enum, {}).get(cpp_name)
            where = f"{enum}::{cpp_name}"
            matched_members.add((enum, cpp_name))
        else:
            cpp_name = CPP_NAMES.get(name, "k" + _camel(name))
            cpp_value = constexprs.get(cpp_name)
            where = cpp_name
            matched_constexprs.add(cpp_name)
        if cpp_value is None:
            problems.append(f"{name} = {value!r} has no C++ {where}")
        elif type(cpp_value) is not type(value) or cpp_value != value:
            problems.append(f"{name} = {value!r} but C++ {where} = {cpp_value!r}")
    known_enums = {enum for enum, _ in groups.values()}
    for enum, members in enums.items():
        if enum not in known_enums:
            problems.append(f"C++ enum {enum} has no Python group")
            continue
        problems += [
            f"C++ {enum}::{member} = {value} has no Python constant"
            for member, value in members.items()
            if (enum, member) not in matched_members
        ]
    problems += [
        f"C++ {name} = {value!r} has no Python constant"
        for name, value in constexprs.items()
        if name not in matched_constexprs
    ]
    return problems


@pytest.mark.parametrize(("module", "header", "groups"), SHARED, ids=SHARED_IDS)
def test_header_matches_python(module, header, groups):
    with open(os.path.join(ROOT, header), encoding="utf-8") as handle:
        text = handle.read()
    assert mismatches(python_constants(module), text, groups) == []


@pytest.mark.parametrize(("module", "header", "groups"), SHARED, ids=SHARED_IDS)
def test_enum_groups_are_distinct(module, header, groups):
    for prefix in groups:
        values = [value for name, value in python_constants(module).items() if name.startswith(prefix)]
        assert values, f"{module.__name__} has no {prefix}* constant"
        assert len(set(values)) == len(values), f"{module.__name__}: two {prefix}* constants share a value"


def test_grpo_columns_and_metrics():
    c = _grpo_constants
    stats = sorted(value for name, value in python_constants(c).items() if name.startswith("STAT_"))
    assert stats == list(range(c.NUM_SEQUENCE_STATS))
    metrics = {value: name for name, value in python_constants(c).items() if name.startswith("METRIC_")}
    assert sorted(metrics) == list(range(c.NUM_METRICS)) and len(c.METRIC_NAMES) == c.NUM_METRICS
    # METRIC_NAMES is in metrics-vector order: each name's index is its METRIC_* constant.
    expected = {"clip_ratio/low_mean": "METRIC_LOW", "clip_ratio/high_mean": "METRIC_HIGH",
                "clip_ratio/region_mean": "METRIC_REGION", "kl": "METRIC_KL", "ratio_mean": "METRIC_RATIO"}
    assert [metrics[index] for index in range(c.NUM_METRICS)] == [expected[name] for name in c.METRIC_NAMES]
    assert c.LOG_RATIO_LIMIT == 20.0 and c.KL_LIMIT == 10.0  # TRL's and verl's clamps


def test_token_logprobs_columns():
    c = _token_logprobs_constants
    assert sorted([c.STAT_ROW_MAX, c.STAT_LOG_SUM]) == list(range(c.NUM_SOFTMAX_STATS))


def test_welfare_scales():
    c = _welfare_constants
    assert c.SCALES == {"group": c.SCALE_GROUP, "batch": c.SCALE_BATCH, "none": c.SCALE_NONE}


def test_sample_status_ok_is_zero():
    # The Python side tests `status != 0` on the whole tensor.
    assert _sample_constants.STATUS_OK == 0


@pytest.mark.parametrize("module", list(KERNEL_MODULES), ids=list(KERNEL_MODULES.values()))
def test_triton_kernels_bind_the_shared_values(module):
    kernels = pytest.importorskip(f"gtalign_fast.kernels.{KERNEL_MODULES[module]}")
    # A kernel binds its op's constants and the error codes of the device checks.
    shared = python_constants(module) | python_constants(_device_checks)
    bound = {name: value for name, value in vars(kernels).items() if isinstance(value, tl.constexpr)}
    assert bound, f"{kernels.__name__} binds no tl.constexpr global"
    for name, value in bound.items():
        assert name in shared, f"{kernels.__name__}.{name} is not defined in {module.__name__}"
        assert value.value == shared[name], f"{kernels.__name__}.{name} differs from {module.__name__}"


# The check itself: it must catch a constant missing on either side and a wrong value.
_HEADER = """
constexpr int64_t kNumThings = 2;  // a comment with = and ;
enum Thing : int64_t { kFirst = 0, kSecond };
constexpr float kLimit = 20.0f;
"""
_GROUPS = {"THING_": ("Thing", "k")}
_PYTHON = {"NUM_THINGS": 2, "THING_FIRST": 0, "THING_SECOND": 1, "LIMIT": 20.0}


def test_check_accepts_agreement():
    assert mismatches(_PYTHON, _HEADER, _GROUPS) == []


@pytest.mark.parametrize(
    ("python", "header", "problem"),
    [
        ({**_PYTHON, "THING_THIRD": 2}, _HEADER, "THING_THIRD = 2 has no C++ Thing::kThird"),
        ({**_PYTHON, "EXTRA": 1}, _HEADER, "EXTRA = 1 has no C++ kExtra"),
        ({k: v for k, v in _PYTHON.items() if k != "THING_SECOND"}, _HEADER, "Thing::kSecond = 1 has no Python"),
        ({k: v for k, v in _PYTHON.items() if k != "LIMIT"}, _HEADER, "kLimit = 20.0 has no Python"),
        ({**_PYTHON, "THING_SECOND": 2}, _HEADER, "THING_SECOND = 2 but C++ Thing::kSecond = 1"),
        ({**_PYTHON, "LIMIT": 10.0}, _HEADER, "LIMIT = 10.0 but C++ kLimit = 20.0"),
        ({**_PYTHON, "LIMIT": 20}, _HEADER, "LIMIT = 20 but C++ kLimit = 20.0"),
        (_PYTHON, _HEADER + "enum Other : int { kOther = 0 };", "enum Other has no Python group"),
    ],
)
def test_check_reports_disagreement(python, header, problem):
    problems = mismatches(python, header, _GROUPS)
    assert any(problem in line for line in problems), problems


def test_check_refuses_unparsable_values():
    with pytest.raises(ValueError):
        parse_header("constexpr int64_t kNumThings = kFirst + 2;")
