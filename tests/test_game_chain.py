"""Tests of gtalign_fast.game.chain (splitting, format regex, F) and .payoff (parsing, P, Pareto)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gtalign_fast.game import (
    MAX_PAYOFF_CHARS,
    PAYOFF_KEYS,
    Cell,
    PayoffError,
    PayoffMatrix,
    extract_tag,
    format_matches,
    format_payoff,
    format_reward,
    pareto_frontier,
    parse_payoff,
    parse_payoff_strict,
    payoff_diversity,
    score_completion,
    split_chain,
)
from gtalign_fast.game.chain import FORMAT_PATTERN

EXAMPLE = (
    '{"DQ_AQ": {"LLM": 2.2, "user": 1.9}, "DQ_CQ": {"LLM": 3.1, "user": 3.5}, "DQ_DA": {"LLM": 4.2, '
    '"user": 4.3}, "VQ_AQ": {"LLM": 2.0, "user": 2.1}, "VQ_CQ": {"LLM": 1.3, "user": 1.2}, "VQ_DA": '
    '{"LLM": 2.0, "user": 1.8}}'
)
EXAMPLE_DICT = json.loads(EXAMPLE)


def chain(payoff: str = EXAMPLE, *, thinking="think", analyze="DQ_DA is best", response="the answer", sep="") -> str:
    return (
        f"<thinking>{thinking}</thinking>{sep}<payoff>{payoff}</payoff>{sep}"
        f"<analyze>{analyze}</analyze>{sep}<response>{response}</response>"
    )


def reference_format(text: str) -> bool:
    return re.match(FORMAT_PATTERN, text, re.DOTALL | re.MULTILINE) is not None


# ---------------------------------------------------------------------------------------------
# Splitting and tags
# ---------------------------------------------------------------------------------------------


def test_split_chain_blocks_and_reason():
    text = chain(thinking="  t1 \n", analyze=" a ", response="\n r \n", sep="\n  ")
    c = split_chain(text)
    assert (c.thinking, c.analyze, c.response) == ("t1", "a", "r")
    assert c.payoff == EXAMPLE
    assert c.reason == text.split("<response>")[0]
    assert c.in_order and c.format_ok and not c.hard_failure
    assert c.F == 1.0
    assert c.matrix == PayoffMatrix.from_mapping(EXAMPLE_DICT)
    assert c.problems == ()


def test_extract_tag_first_match_and_tags_inside_tags():
    text = "<response>one</response> x <response>two</response>"
    assert extract_tag(text, "response") == "one"
    # a nested opening tag is just content; the first closing tag ends the block
    assert extract_tag("<analyze>a <analyze> b</analyze> c</analyze>", "analyze") == "a <analyze> b"
    # the first opening tag without a closing tag after it: no match at all (as re.search)
    assert extract_tag("</payoff><payoff>x", "payoff") is None
    assert extract_tag("<payoff>x", "payoff") is None
    assert extract_tag("nothing", "payoff") is None
    assert extract_tag(None, "payoff") is None
    for text in ["<payoff>a</payoff><payoff>b</payoff>", "x</payoff><payoff> y </payoff>", "<payoff></payoff>"]:
        m = re.search(r"<payoff>(.*?)</payoff>", text, re.DOTALL)
        assert extract_tag(text, "payoff") == m.group(1).strip()


def test_reason_is_text_before_first_response_tag_even_inside_thinking():
    text = chain(thinking="I will write <response> later")
    c = split_chain(text)
    assert c.reason == "<thinking>I will write "
    # the first <response> opening is inside thinking, so the response block starts there
    assert c.response.startswith("later</thinking>")


def test_missing_blocks_are_reported_and_hard_failures():
    no_response = "<thinking>t</thinking><payoff>" + EXAMPLE + "</payoff><analyze>a</analyze>"
    c = split_chain(no_response)
    assert c.response is None and c.hard_failure and "missing <response> block" in c.problems
    c = split_chain("<thinking>t</thinking><analyze>a</analyze><response>r</response>")
    assert c.payoff is None and c.hard_failure
    c = split_chain(chain(payoff="{not json}"))
    assert c.matrix is None and c.hard_failure and c.payoff_error
    assert any("payoff does not parse" in p for p in c.problems)


def test_out_of_order_parses_but_format_is_zero():
    text = "<payoff>" + EXAMPLE + "</payoff><thinking>t</thinking><analyze>a</analyze><response>r</response>"
    c = split_chain(text)
    assert not c.hard_failure and not c.in_order and c.F == 0.0 and c.matrix is not None
    assert format_reward(text) == 0.0


@pytest.mark.parametrize("bad", [None, 123, b"<thinking>", ["a"]])
def test_non_string_input_is_a_hard_failure(bad):
    c = split_chain(bad)
    assert c.hard_failure and c.F == 0.0 and not format_matches(bad) and format_reward(bad) == 0.0


# ---------------------------------------------------------------------------------------------
# The format regex
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (chain(), True),
        (chain(sep=" \n\t "), True),
        (chain() + "\n", True),
        # MULTILINE: ``$`` also matches before a newline, so text after "</response>\n" still passes
        (chain() + "\ntrailing junk", True),
        (chain() + " trailing", False),
        (chain() + "x\n", False),
        (" " + chain(), False),  # ^ at position 0 only (re.match)
        (chain(sep=" x "), False),
        (chain().replace("<analyze>", "<analyse>").replace("</analyze>", "</analyse>"), False),
        ("<thinking></thinking><payoff></payoff><analyze></analyze><response></response>", True),
        # lazy blocks may run over a later closing tag: a second complete chain rescues a broken ending
        (chain(response="a</response> x") + "\n", True),
        (chain(response="a</response>\n b"), True),
        ("<thinking>a</thinking><payoff>b</payoff><analyze>c</analyze><response>d", False),
    ],
)
def test_format_matches_reference_regex(text, expected):
    assert reference_format(text) is expected
    assert format_matches(text) is expected


_FRAGMENTS = st.sampled_from(
    [
        "<thinking>", "</thinking>", "<payoff>", "</payoff>", "<analyze>", "</analyze>", "<response>",
        "</response>", " ", "\n", "\t", "x", "{}", "<", ">", "/", "\u2003",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_FRAGMENTS, max_size=24))
def test_format_matches_equals_regex_on_generated_text(parts):
    text = "".join(parts)
    assert format_matches(text) == reference_format(text)
    assert format_matches("<thinking>" + text) == reference_format("<thinking>" + text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(range(8)), max_size=12), st.text(alphabet=" \nx", max_size=3))
def test_format_matches_equals_regex_on_tag_soup(order, filler):
    tags = [
        "<thinking>", "</thinking>", "<payoff>", "</payoff>", "<analyze>", "</analyze>", "<response>", "</response>"
    ]
    text = "<thinking>" + filler.join(tags[i] for i in order) + filler
    assert format_matches(text) == reference_format(text)


# ---------------------------------------------------------------------------------------------
# Payoff parsing
# ---------------------------------------------------------------------------------------------


def test_parse_json_example():
    m = parse_payoff_strict(EXAMPLE)
    assert m["DQ_DA"] == Cell(4.2, 4.3)
    assert m.cell("VQ", "CQ") == Cell(1.3, 1.2)
    assert m.to_dict() == EXAMPLE_DICT


PY_FORMS = [
    # single quotes, any key order, ints
    "{'VQ_DA': {'user': 1.8, 'LLM': 2}, 'VQ_CQ': {'user': 1.2, 'LLM': 1.3}, 'VQ_AQ': {'user': 2.1, 'LLM': 2.0},"
    " 'DQ_DA': {'user': 4.3, 'LLM': 4.2}, 'DQ_CQ': {'user': 3.5, 'LLM': 3.1}, 'DQ_AQ': {'user': 1.9, 'LLM': 2.2}}",
    # curly double quotes
    EXAMPLE.replace('"DQ_AQ"', "\u201cDQ_AQ\u201d").replace('"LLM"', "\u201cLLM\u201d"),
    # curly single quotes
    EXAMPLE.replace('"', "'").replace("'DQ_CQ'", "\u2018DQ_CQ\u2019"),
    # trailing commas, comments, newlines, explicit + sign, "- 1" spacing, u-prefix, escapes
    "{\n  # the matrix\n  'DQ_AQ': {'LLM': +2.2, 'user': 1.9,},\n  u'DQ_CQ': {'LLM': 3.1, 'user': 3.5},\n"
    "  'DQ_DA': {'LLM': 4.2, 'user': 4.3},\n  'VQ_AQ': {'LLM': 2.0, 'user': 2.1},\n"
    "  'VQ_\\x43Q': {'LLM': 1.3, 'user': 1.2},\n  \"VQ_DA\": {\"LLM\": 2.0, 'user': 1.8},\n}",
]


@pytest.mark.parametrize("text", PY_FORMS)
def test_parse_python_literal_forms(text):
    m = parse_payoff(text)
    assert m is not None
    assert m["DQ_AQ"] == Cell(2.2, 1.9) and m["VQ_DA"] == Cell(2.0, 1.8) and m["VQ_CQ"] == Cell(1.3, 1.2)


def test_parse_python_numbers():
    base = {k: {"LLM": 1, "user": 1} for k in PAYOFF_KEYS}
    text = repr(base)
    cases = [("1_0", 10.0), ("0x1F", 31.0), (".5", 0.5), ("1.", 1.0), ("1e1", 10.0), ("- 2.5", -2.5), ("0", 0.0)]
    for literal, value in cases:
        m = parse_payoff(text.replace("'LLM': 1,", f"'LLM': {literal},", 1))
        assert m is not None, literal
        assert m["DQ_AQ"].llm == value
    for literal in ["01", "1j", "1.5.2", "--1", "(1)", "1 2", "0b2", "'1'", "1e"]:
        assert parse_payoff(text.replace("'LLM': 1,", f"'LLM': {literal},", 1)) is None, literal


def _variant(**changes):
    data = json.loads(EXAMPLE)
    data.update(changes)
    return data


REJECTED = [
    ("five keys", json.dumps({k: v for k, v in EXAMPLE_DICT.items() if k != "VQ_DA"})),
    ("seven keys", json.dumps(_variant(VQ_XX={"LLM": 1, "user": 1}))),
    ("lowercase llm", EXAMPLE.replace('"LLM": 2.2', '"llm": 2.2')),
    ("extra sub key", json.dumps(_variant(DQ_AQ={"LLM": 1, "user": 1, "x": 0}))),
    ("string value", EXAMPLE.replace("2.2", '"2.2"')),
    ("json true", EXAMPLE.replace("2.2", "true")),
    ("python True", EXAMPLE.replace('"', "'").replace("2.2", "True")),
    ("null", EXAMPLE.replace("2.2", "null")),
    ("None", EXAMPLE.replace('"', "'").replace("2.2", "None")),
    ("NaN", EXAMPLE.replace("2.2", "NaN")),
    ("Infinity", EXAMPLE.replace("2.2", "Infinity")),
    ("-Infinity", EXAMPLE.replace("2.2", "-Infinity")),
    ("overflow to inf", EXAMPLE.replace("2.2", "1e999")),
    ("python nan call", EXAMPLE.replace('"', "'").replace("2.2", "float('nan')")),
    ("huge int", EXAMPLE.replace("2.2", "9" * 400)),
    ("duplicate top key json", EXAMPLE[:-1] + ', "DQ_AQ": {"LLM": 0, "user": 0}}'),
    ("duplicate sub key json", EXAMPLE.replace('"LLM": 2.2,', '"LLM": 2.2, "LLM": 1.0,')),
    ("duplicate key python", EXAMPLE.replace('"', "'")[:-1] + ", 'DQ_AQ': {'LLM': 0, 'user': 0}}"),
    ("list value", EXAMPLE.replace("2.2", "[2.2]")),
    ("list top level", "[" + EXAMPLE + "]"),
    ("empty", "   "),
    ("unterminated", EXAMPLE[:-1]),
    ("trailing text", EXAMPLE + " extra"),
    ("python call", "dict(" + EXAMPLE + ")"),
    ("deep nesting", "[" * 3000 + "]" * 3000),
    ("deep dicts", "{'a': " * 1000 + "1" + "}" * 1000),
    ("too long", EXAMPLE[:-1] + " " * MAX_PAYOFF_CHARS + "}"),
    ("newline in python string", EXAMPLE.replace('"', "'").replace("'DQ_AQ'", "'DQ_\nAQ'")),
    ("eval attempt", "__import__('os').system('echo hi')"),
    ("python inf name", EXAMPLE.replace('"', "'").replace("2.2", "inf")),
    ("string NaN", EXAMPLE.replace("2.2", '"NaN"')),
    ("fullwidth digits", EXAMPLE.replace('"', "'").replace("2.2", "\uff12.\uff12")),
    ("arabic-indic digits json", EXAMPLE.replace("2.2", "\u0662")),
    ("cyrillic lookalike key", EXAMPLE.replace('"DQ_AQ"', '"DQ_\u0410Q"')),
    ("zero-width space", EXAMPLE.replace('"', "'").replace(", ", ",\u200b ", 1)),
]


@pytest.mark.parametrize("why, text", REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected_payoffs(why, text):
    assert parse_payoff(text) is None
    with pytest.raises(PayoffError):
        parse_payoff_strict(text)
    assert format_reward(chain(payoff=text)) == 0.0
    result = score_completion(chain(payoff=text), 1.0)
    assert result.hard_failure and result.score == 0.0


def test_parse_accepts_block_at_the_size_cap():
    padded = EXAMPLE[:-1] + " " * (MAX_PAYOFF_CHARS - len(EXAMPLE)) + "}"
    assert len(padded) == MAX_PAYOFF_CHARS
    assert parse_payoff(padded) is not None


def test_json_escapes_in_keys():
    assert parse_payoff(EXAMPLE.replace('"DQ_AQ"', '"DQ\\u005fAQ"')) is not None


# ---------------------------------------------------------------------------------------------
# PayoffMatrix value
# ---------------------------------------------------------------------------------------------


def test_payoff_matrix_value_semantics():
    a = PayoffMatrix.from_mapping(EXAMPLE_DICT)
    b = parse_payoff(EXAMPLE.replace("2.0", "2"))
    assert a == b and hash(a) == hash(b)
    assert list(a) == list(PAYOFF_KEYS) and len(a) == 6 and "DQ_DA" in a and "XX" not in a
    assert a.row("VQ") == {"AQ": Cell(2.0, 2.1), "CQ": Cell(1.3, 1.2), "DA": Cell(2.0, 1.8)}
    c = a.replace("VQ_DA", user=5.0)
    assert c["VQ_DA"] == Cell(2.0, 5.0) and a["VQ_DA"] == Cell(2.0, 1.8) and c != a
    assert Cell(1, 2).welfare == 3.0
    with pytest.raises(KeyError):
        a["DQ_XX"]
    with pytest.raises(ValueError):
        a.cell("XQ", "DA")
    with pytest.raises(PayoffError):
        PayoffMatrix((Cell(1, 1),) * 5)
    with pytest.raises(PayoffError):
        Cell(math.nan, 1.0)
    with pytest.raises(PayoffError):
        Cell(True, 1.0)
    with pytest.raises(PayoffError):
        PayoffMatrix.from_mapping({"DQ_AQ": 1})


def test_best_action_helper():
    m = PayoffMatrix.from_mapping(EXAMPLE_DICT)
    assert m.best_action("welfare") == "DQ_DA"
    assert m.best_action("welfare", question_type="VQ") == "VQ_AQ"


# ---------------------------------------------------------------------------------------------
# Formatter
# ---------------------------------------------------------------------------------------------


def test_format_payoff_canonical_text():
    m = parse_payoff(PY_FORMS[0])
    assert format_payoff(m) == EXAMPLE  # canonical order, JSON, one line, like the prompt's example
    multi = format_payoff(m, indent=2)
    assert multi.startswith('{\n  "DQ_AQ": {"LLM": 2.2, "user": 1.9},\n') and parse_payoff(multi) == m
    noisy = m.replace("DQ_AQ", llm=0.1 + 0.2, user=-0.0)
    assert '"DQ_AQ": {"LLM": 0.3, "user": 0.0}' in format_payoff(noisy)
    assert m.to_text() == EXAMPLE


_VALUES = st.floats(min_value=-9.9, max_value=9.9, allow_nan=False).map(lambda x: round(x, 1))
_MATRICES = st.lists(st.tuples(_VALUES, _VALUES), min_size=6, max_size=6).map(
    lambda pairs: PayoffMatrix(tuple(Cell(llm, user) for llm, user in pairs))
)


@settings(max_examples=150, deadline=None)
@given(_MATRICES, st.sampled_from([None, 0, 4]))
def test_format_parse_round_trip(matrix, indent):
    text = format_payoff(matrix, indent=indent)
    assert parse_payoff(text) == matrix
    python_form = text.replace('"', "'")
    assert parse_payoff(python_form) == matrix
    assert split_chain(chain(payoff=text)).matrix == matrix


# ---------------------------------------------------------------------------------------------
# P and Pareto
# ---------------------------------------------------------------------------------------------


def test_payoff_diversity_hand_computed():
    equal = PayoffMatrix((Cell(1, 1),) * 6)
    assert payoff_diversity(equal) == 0.0
    # DQ_AQ differs by 5% (first term only), DQ_CQ by 50% (both), others equal
    cells = (Cell(1.0, 1.05), Cell(2.0, 1.0)) + (Cell(3, 3),) * 4
    assert payoff_diversity(PayoffMatrix(cells)) == pytest.approx(3 / 12)
    # zero and a tiny value: the denominator is floored at 1e-8, so |0 - 5e-10| / 1e-8 = 0.05
    cells = (Cell(0.0, 5e-10),) + (Cell(-1, 1),) * 5
    assert payoff_diversity(PayoffMatrix(cells)) == pytest.approx(1 / 12 + 5 * 2 / 12)
    example = PayoffMatrix.from_mapping(EXAMPLE_DICT)
    # every cell has user != LLM; relative gaps 0.3/2.2 and 0.4/3.5 exceed 0.1; 0.1/4.3, 0.1/2.1,
    # 0.1/1.3 do not, and VQ_DA's |1.8 - 2.0| / 2.0 is 0.09999999999999998 in floats (not > 0.1)
    assert payoff_diversity(example) == pytest.approx((6 + 2) / 12)


def test_pareto_frontier():
    m = PayoffMatrix.from_mapping(EXAMPLE_DICT)
    assert pareto_frontier(m) == ("DQ_DA",)
    assert pareto_frontier(m, "VQ") == ("VQ_AQ",)  # (2.0, 2.1) dominates VQ_DA (2.0, 1.8) and VQ_CQ
    cells = (Cell(1, 5), Cell(5, 1), Cell(3, 3), Cell(3, 3), Cell(2, 2), Cell(1, 4.9))
    assert pareto_frontier(PayoffMatrix(cells)) == ("DQ_AQ", "DQ_CQ", "DQ_DA", "VQ_AQ")  # equal cells both stay
    assert m.pareto_frontier() == ("DQ_DA",)


# ---------------------------------------------------------------------------------------------
# Hostile input: bounded time, never raises
# ---------------------------------------------------------------------------------------------

TWO_MB = 2 * 1024 * 1024


def _hostile_texts():
    unit = "</thinking><payoff></payoff><analyze></analyze><response></response>x"
    yield "<thinking>" + unit * (TWO_MB // len(unit))  # polynomial backtracking bait for the regex
    yield "<thinking>" + "</thinking> <payoff>" * (TWO_MB // 20)
    yield "<response>" * (TWO_MB // 10)
    yield "<payoff>" + "{" * TWO_MB + "</payoff>"
    yield chain(payoff="[" * TWO_MB, response="r" * 10)
    yield chain(thinking="word " * (TWO_MB // 5))
    yield "<thinking>" + "\\boxed{" * (TWO_MB // 7)


@pytest.mark.parametrize("index", range(7))
def test_two_megabyte_completions_are_fast(index):
    text = list(_hostile_texts())[index]
    assert len(text) >= TWO_MB - 100
    start = time.perf_counter()
    split_chain(text)
    format_reward(text)
    result = score_completion(text, 1.0)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.75, elapsed
    assert 0.0 <= result.score <= 1.0


def test_over_long_text_is_a_hard_failure(monkeypatch):
    import gtalign_fast.game.chain as chain_module

    monkeypatch.setattr(chain_module, "MAX_TEXT_CHARS", 100)
    text = chain(thinking="x" * 200)
    assert split_chain(text).hard_failure and not format_matches(text)


_MUTATION_ALPHABET = st.sampled_from(
    list("{}[]'\"\u201c\u201d:,.-+0123456789eE \n<>/_#\\")
    + ["NaN", "LLM", "user", "DQ_AQ", "</payoff>", "<response>", "True"]
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _MATRICES,
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 3), _MUTATION_ALPHABET), max_size=6),
    st.data(),
)
def test_mutated_chains_never_raise(matrix, mutations, data):
    text = chain(payoff=format_payoff(matrix, indent=data.draw(st.sampled_from([None, 1]))))
    chars = list(text)
    for position, kind, token in mutations:
        position %= len(chars) + 1
        if kind == 0 and chars:
            del chars[min(position, len(chars) - 1)]
        elif kind == 1:
            chars.insert(position, token)
        elif kind == 2 and chars:
            chars[min(position, len(chars) - 1)] = token
        else:
            chars[position:position] = list(token * 3)
    mutated = "".join(chars)
    c = split_chain(mutated)
    assert format_matches(mutated) == reference_format(mutated)
    result = score_completion(mutated, 1.0, 0.5)
    if result.hard_failure:
        assert result.logged() == dict.fromkeys(result.logged(), 0.0)
    else:
        assert 1e-4 <= result.user_reward <= 1.0 and 1e-4 <= result.llm_reward <= 1.0
        assert c.matrix is not None and c.response is not None
    if c.matrix is not None:
        assert all(math.isfinite(v) for cell in c.matrix.cells for v in (cell.llm, cell.user))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_never_raises(text):
    for candidate in (text, "<payoff>" + text + "</payoff>", chain(payoff=text)):
        split_chain(candidate)
        parse_payoff(text)
        score_completion(candidate, 0.3)


def test_game_module_imports_without_torch_or_extension():
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('gtalign_fast'); pkg.__path__ = [{str(root / 'gtalign_fast')!r}]\n"
        "sys.modules['gtalign_fast'] = pkg\n"
        "import gtalign_fast.game as g\n"
        "assert 'torch' not in sys.modules, 'game imported torch'\n"
        "assert not any(m.startswith('gtalign_fast._C') for m in sys.modules)\n"
        "print(g.score_completion('x', 1.0).score)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.0"
