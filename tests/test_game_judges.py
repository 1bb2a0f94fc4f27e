"""Tests of gtalign_fast.game.judges: math, BLEU, the OpenAI-compatible client, run_judge."""

from __future__ import annotations

import http.server
import json
import math
import re
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gtalign_fast.game import (
    AnswerScore,
    BleuJudge,
    CompositeJudge,
    Judge,
    JudgeItem,
    MathJudge,
    OpenAIJudge,
    PayoffMatrix,
    analyze_pareto_score,
    as_judge,
    char_bleu,
    extract_boxed,
    math_answers_equal,
    normalize_math_answer,
    run_judge,
    scaled_verdict,
    wildguard_verdict,
)

from .servers import serving, write_slowly

# ---------------------------------------------------------------------------------------------
# \boxed{} extraction and math normalisation
# ---------------------------------------------------------------------------------------------


def test_extract_boxed():
    assert extract_boxed("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{1} then \\boxed{2}") == "2"  # the last one
    assert extract_boxed("\\boxed{1} then \\boxed{2") == "1"  # an unclosed last box is skipped
    assert extract_boxed("\\fbox{x}") == "x"
    assert extract_boxed("answer: \\boxed 5$") == "5"
    assert extract_boxed("\\boxed{a{b{c}}d}") == "a{b{c}}d"
    assert extract_boxed("no box") is None
    assert extract_boxed(None) is None


def test_extract_boxed_is_bounded():
    hostile = "\\boxed{" * 200_000
    start = time.perf_counter()
    assert extract_boxed(hostile) is None
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("\\frac{1}{2}", "1/2"),
        ("\\dfrac{1}{2}", "\\frac12"),
        ("\\tfrac{3}{4}", "0.75"),
        ("$5$", "5.0"),
        (" 5 ", "5.00"),
        ("\\left(1, 2\\right)", "(1,2)"),
        ("x = 3", "3"),
        ("10\\%", "10"),
        ("90^\\circ", "90"),
        ("\\text{(A)}", "(A)"),
        ("0.5", ".5"),
        ("1,000", "1000"),
        ("2.50", "2.5"),
        ("-\\frac{1}{3}", "\\frac{-1}{3}"),
        ("\\sqrt{2}", "\\sqrt{2}"),
        ("\\frac{\\sqrt{3}}{2}", "\\dfrac{\\sqrt{3}}{2}"),
        ("\\boxed{7}", "7"),
        ("\\mathrm{cm}", "cm"),
        ("12.", "12"),
    ],
)
def test_math_answers_equal(answer, reference):
    assert math_answers_equal(answer, reference), (normalize_math_answer(answer), normalize_math_answer(reference))


@pytest.mark.parametrize(
    "answer, reference",
    [("2", "3"), ("1/2", "1/3"), ("\\frac{1}{2}", "2"), ("", "0"), ("(1,2)", "(2,1)"), ("10", "100"), ("1/0", "1/0x")],
)
def test_math_answers_differ(answer, reference):
    assert not math_answers_equal(answer, reference)


def test_math_judge():
    judge = MathJudge()
    items = [
        JudgeItem(response="Thus \\boxed{\\frac{1}{2}}.", reference="0.5"),
        JudgeItem(response="Thus \\boxed{3}.", reference="We get ... so the answer is $\\boxed{3}$."),
        JudgeItem(response="Thus \\boxed{4}.", reference="3"),
        JudgeItem(response="The answer is 3.", reference="3"),
        JudgeItem(response="\\boxed{3}", reference=None),
    ]
    scores = judge.judge_batch(items)
    assert [(s.user, s.llm) for s in scores[:4]] == [(1.0, 1.0), (1.0, 1.0), (0.0, 0.0), (0.0, 0.0)]
    assert scores[4].failed
    lenient = MathJudge(require_boxed=False)
    assert lenient.judge_one(JudgeItem(response="3", reference="3")).user == 1.0
    assert isinstance(judge, Judge)


# ---------------------------------------------------------------------------------------------
# Character BLEU
# ---------------------------------------------------------------------------------------------


def test_char_bleu_hand_computed():
    assert char_bleu("abcd", "abcd") == pytest.approx(1.0)
    # hyp "abcx" vs ref "abcd": p1 = 3/4; bigrams ab bc cx -> 2 matches: (2+1)/(3+1);
    # trigrams abc bcx -> 1: (1+1)/(2+1); 4-gram abcx -> 0: (0+1)/(1+1); BP = 1 (equal lengths)
    expected = (3 / 4 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert char_bleu("abcx", "abcd") == pytest.approx(expected)
    assert char_bleu("abcx", "abcd", smoothing="none") == 0.0
    # brevity penalty: hyp "ab" vs ref "abcd": p1 = 1, p2 = (1+1)/(1+1), p3 = p4 = 1/1; BP = exp(1 - 4/2)
    assert char_bleu("ab", "abcd") == pytest.approx(math.exp(-1.0))
    # clipping: "aaaa" vs "ab": p1 = 1/4, p2 = (0+1)/(3+1), p3 = 1/3, p4 = 1/2; hyp longer: BP = 1
    assert char_bleu("aaaa", "ab") == pytest.approx((1 / 4 * 1 / 4 * 1 / 3 * 1 / 2) ** 0.25)
    # whitespace is a token (nltk on raw strings): "a b" vs "ab"
    assert char_bleu("a b", "ab") < 1.0
    assert char_bleu("", "abc") == 0.0 and char_bleu("abc", "") == 0.0 and char_bleu("xyz", "abc") == 0.0


def test_char_bleu_multiple_references_and_errors():
    assert char_bleu("abcd", ["zzzz", "abcd"]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        char_bleu("a", "a", smoothing="magic")


def test_char_bleu_bounds_the_references():
    # only the first max_references distinct references count (here the match is the 21st)
    decoys = [f"zz{i:02d}" for i in range(20)]
    assert char_bleu("abcd", decoys + ["abcd"]) == char_bleu("abcd", decoys[:4]) < 0.5
    assert char_bleu("abcd", ["zzzz", "abcd"], max_references=1) == char_bleu("abcd", "zzzz")
    refs = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(100_000)) for i in range(20)]
    start = time.perf_counter()
    char_bleu("hello world " * 100, refs)
    assert time.perf_counter() - start < 1.5  # was ~2.8 s with all 20 references
    with pytest.raises(ValueError):
        char_bleu("a", "a", max_references=0)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_char_bleu_in_unit_interval(hyp, ref):
    assert 0.0 <= char_bleu(hyp, ref) <= 1.0 + 1e-12


def test_bleu_and_composite_judges():
    items = [JudgeItem(response="the cat sat", reference="the cat sat"), JudgeItem(response="x", reference=None)]
    bleu = BleuJudge().judge_batch(items)
    assert bleu[0].user == pytest.approx(1.0) and bleu[1].failed
    composite = CompositeJudge(user=BleuJudge(), llm=lambda item: 0.25)
    out = composite.judge_batch(items[:1])
    assert out[0].user == pytest.approx(1.0) and out[0].llm == 0.25 and not out[0].failed


# ---------------------------------------------------------------------------------------------
# run_judge and adapters: failures are scored 0 and flagged, never raised
# ---------------------------------------------------------------------------------------------


def test_run_judge_isolates_failures():
    def judge(item):
        if item.response == "boom":
            raise RuntimeError("judge crashed")
        if item.response == "nan":
            return math.nan
        if item.response == "pair":
            return (0.2, 0.9)
        if item.response == "big":
            return 7
        if item.response == "bool":
            return True
        return 0.5

    items = [JudgeItem(response=r) for r in ["ok", "boom", "nan", "pair", "big", "bool"]]
    out = run_judge(judge, items)
    assert [(s.user, s.llm, s.failed) for s in out] == [
        (0.5, 0.5, False), (0.0, 0.0, True), (0.0, 0.0, True), (0.2, 0.9, False), (1.0, 1.0, False), (0.0, 0.0, True),
    ]
    assert run_judge(judge, []) == []
    assert all(s.failed for s in run_judge(object(), items[:2]))


def test_run_judge_wrong_batch_size_falls_back_per_item():
    class Short:
        def judge_batch(self, items):
            return [AnswerScore.both(1.0)] if len(items) == 1 else []

    assert [s.user for s in run_judge(Short(), [JudgeItem("a"), JudgeItem("b")])] == [1.0, 1.0]
    with pytest.raises(TypeError):
        as_judge(42)


def test_verdict_mappers():
    item = JudgeItem(response="r", columns={"harmful": True})
    harmless = JudgeItem(response="r", columns={"extra_info": {"harmful": False}})
    wg = wildguard_verdict()
    assert (wg(0, item).user, wg(0, item).llm) == (1.0, 0.0)
    assert (wg(1, item).user, wg(1, item).llm) == (0.0, 1.0)
    assert (wg(0, harmless).user, wg(2, harmless).llm) == (0.0, 1.0)
    assert scaled_verdict(4)(3, item).user == 0.75 and scaled_verdict(4)(9, item).llm == 1.0


def test_analyze_pareto_score():
    m = PayoffMatrix.from_mapping({
        "DQ_AQ": {"LLM": 1, "user": 5}, "DQ_CQ": {"LLM": 5, "user": 1}, "DQ_DA": {"LLM": 3, "user": 3},
        "VQ_AQ": {"LLM": 0, "user": 0}, "VQ_CQ": {"LLM": 2, "user": 2}, "VQ_DA": {"LLM": 1, "user": 1},
    })
    text = "<thinking>t</thinking><payoff>{}</payoff><analyze>{}</analyze><response>r</response>"
    assert analyze_pareto_score(text.format("p", "frontier: DQ_AQ, DQ_DA. Choose DQ_DA"), m) == 1.0
    assert analyze_pareto_score(text.format("p", "Choose VQ_CQ"), m) == 0.0
    assert analyze_pareto_score(text.format("p", "go with DA"), m) == 0.5
    assert analyze_pareto_score(text.format("p", "nothing"), m) == 0.0
    assert analyze_pareto_score(text, None) == 0.0


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible client against a local server
# ---------------------------------------------------------------------------------------------

MAX_REQUESTS = 400


class _FakeJudgeServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests = 0
        self.active = 0
        self.max_active = 0
        self.seen_ids: set[str] = set()
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.redirect_to = ""


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _FakeJudgeServer

    def log_message(self, *args):  # keep test output clean
        pass

    def _reply(self, code: int, body: bytes):
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout test)
            pass

    def _chat(self, content: str) -> bytes:
        return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()

    def _trickle(self, head: bytes, body: bytes):
        write_slowly(self.wfile, head + body)
        self.close_connection = True

    def do_GET(self):  # only a followed redirect gets here
        with self.server.lock:
            self.server.requests += 1
            self.server.auth.append(self.headers.get("Authorization"))
        self._reply(200, self._chat("<score>1</score>"))

    def do_POST(self):
        srv = self.server
        with srv.lock:
            srv.requests += 1
            count = srv.requests
            srv.active += 1
            srv.max_active = max(srv.max_active, srv.active)
        try:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            with srv.lock:
                srv.bodies.append(body)
                srv.auth.append(self.headers.get("Authorization"))
            if self.path != "/v1/chat/completions":
                return self._reply(404, b"{}")
            if count > MAX_REQUESTS:  # bounded: a runaway client cannot spin forever
                return self._reply(503, b"{}")
            prompt = body["messages"][-1]["content"]
            mode = re.search(r"MODE=(\S+)", prompt).group(1)
            ident = re.search(r"ID=(\S+)", prompt)
            ident = ident.group(1) if ident else ""
            if mode.startswith("ok:"):
                if "DELAY" in prompt:
                    time.sleep(0.15)
                return self._reply(200, self._chat(f"thought: fine\n<score>{mode[3:]}</score>"))
            if mode.startswith("boxed:"):
                return self._reply(200, self._chat(f"example \\boxed{{0}} ... final \\boxed{{{mode[6:]}}}"))
            if mode == "flaky500":
                with srv.lock:
                    first = ident not in srv.seen_ids
                    srv.seen_ids.add(ident)
                return self._reply(500, b"{}") if first else self._reply(200, self._chat("<score>1</score>"))
            if mode == "always500":
                return self._reply(500, b'{"error": "overloaded"}')
            if mode == "bad400":
                return self._reply(400, b'{"error": "bad request"}')
            if mode == "slow":
                time.sleep(1.0)
                return self._reply(200, self._chat("<score>1</score>"))
            if mode == "malformed":
                return self._reply(200, self._chat("I believe the answer is fine."))
            if mode == "badjson":
                return self._reply(200, b"this is not json")
            if mode == "nocontent":
                return self._reply(200, b'{"choices": [{"message": {"content": null}}]}')
            if mode == "trickle_headers":  # each byte well inside the per-read timeout; ~3 s in all
                return self._trickle(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 60 + b"\r\n", b"")
            if mode == "trickle_body":
                body = self._chat("<score>1</score>")
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                return self._trickle(head.encode(), body)
            if mode == "cut":  # promise 500 bytes, send 20, hang up
                head = b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n"
                self.wfile.write(head + self._chat("<score>1</score>")[:20])
                self.close_connection = True
                return None
            if mode == "redirect":
                try:
                    self.send_response(302)
                    self.send_header("Location", srv.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass
                return None
            if mode == "huge":
                return self._reply(200, self._chat("<score>1</score>" + "x" * 5000))
            return self._reply(404, b"{}")
        finally:
            with srv.lock:
                srv.active -= 1


@pytest.fixture
def server():
    with serving(_FakeJudgeServer()) as srv:
        yield srv


def _judge(server, **kwargs) -> OpenAIJudge:
    host, port = server.server_address
    # A generous deadline: the tests that expect a timeout set their own, shorter than the server's delay.
    defaults = dict(prompt="{prompt}", timeout=2.0, max_retries=1, backoff=0.01, concurrency=4)
    defaults.update(kwargs)
    return OpenAIJudge(f"http://{host}:{port}/v1", "judge-model", **defaults)


def _items(*prompts: str) -> list[JudgeItem]:
    return [JudgeItem(response="resp", prompt=p, reference="ref") for p in prompts]


def test_client_reads_verdicts_in_order(server):
    judge = _judge(server, scale=4, api_key="secret", max_tokens=32, temperature=0.0, extra_body={"top_k": 20})
    out = judge.judge_batch(_items("MODE=ok:4", "MODE=ok:2", "MODE=ok:0", "MODE=boxed:3", "MODE=ok:7"))
    assert [s.user for s in out] == [1.0, 0.5, 0.0, 0.75, 1.0]  # last \boxed wins; clamped to [0, 1]
    assert not any(s.failed for s in out)
    stats = judge.stats
    assert stats.items == 5 and stats.requests == 5 and stats.failures == 0 and stats.retries == 0
    body = server.bodies[0]
    assert body["model"] == "judge-model" and body["max_tokens"] == 32
    assert body["temperature"] == 0.0 and body["top_k"] == 20
    assert body["messages"][0]["role"] == "user"
    assert set(server.auth) == {"Bearer secret"}


def test_client_is_concurrent(server):
    judge = _judge(server, concurrency=4)
    start = time.perf_counter()
    out = judge.judge_batch(_items(*[f"MODE=ok:1 DELAY ID={i}" for i in range(8)]))
    elapsed = time.perf_counter() - start
    assert all(s.user == 1.0 for s in out)
    assert server.max_active >= 2
    assert elapsed < 8 * 0.15


def test_client_retries_a_500(server):
    judge = _judge(server, max_retries=2)
    out = judge.judge_batch(_items("MODE=flaky500 ID=a", "MODE=flaky500 ID=b"))
    assert [s.user for s in out] == [1.0, 1.0] and not any(s.failed for s in out)
    stats = judge.stats
    assert stats.http_errors == 2 and stats.retries == 2 and stats.requests == 4 and stats.failures == 0


def test_client_persistent_500_scores_zero_and_counts(server):
    sleeps = []
    judge = _judge(server, max_retries=2, backoff=0.01, sleep=sleeps.append)
    out = judge.judge_one(_items("MODE=always500")[0])
    assert out.failed and (out.user, out.llm) == (0.0, 0.0) and "500" in out.detail
    assert judge.stats.requests == 3 and judge.stats.failures == 1
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0]  # exponential backoff
    assert 0.01 <= sleeps[0] <= 0.011 and 0.02 <= sleeps[1] <= 0.022


def test_client_timeout_scores_zero_and_counts(server):
    judge = _judge(server, timeout=0.25, max_retries=1)
    start = time.perf_counter()
    out = judge.judge_batch(_items("MODE=slow", "MODE=ok:1"))
    assert out[0].failed and out[0].user == 0.0 and "timeout" in out[0].detail
    assert out[1].user == 1.0 and not out[1].failed
    assert judge.stats.timeouts == 2 and judge.stats.failures == 1 and judge.stats.retries == 1
    assert time.perf_counter() - start < 2.0


def test_client_malformed_answers(server):
    judge = _judge(server)
    out = judge.judge_batch(_items("MODE=malformed", "MODE=badjson", "MODE=nocontent"))
    assert all(s.failed and s.user == 0.0 for s in out)
    stats = judge.stats
    assert stats.malformed == 3 and stats.failures == 3 and stats.retries == 0  # not retried by default
    retrying = _judge(server, retry_malformed=True, max_retries=2)
    assert retrying.judge_one(_items("MODE=malformed")[0]).failed
    assert retrying.stats.requests == 3 and retrying.stats.malformed == 3


def test_client_does_not_retry_a_400_and_survives_a_dead_server(server):
    judge = _judge(server, max_retries=3)
    assert judge.judge_one(_items("MODE=bad400")[0]).failed
    assert judge.stats.requests == 1
    dead = OpenAIJudge("http://127.0.0.1:9/v1", "m", timeout=0.2, max_retries=1, backoff=0.0)
    out = dead.judge_batch(_items("MODE=ok:1", "MODE=ok:1"))
    assert all(s.failed for s in out) and dead.stats.failures == 2
    assert dead.stats.connection_errors + dead.stats.timeouts == 4
    dead.reset_stats()
    assert dead.stats.failures == 0


def test_client_custom_prompt_and_mapping(server):
    seen = []

    def build(item):
        seen.append(item.reference)
        return [{"role": "system", "content": "judge"}, {"role": "user", "content": "MODE=ok:1"}]

    harmful = JudgeItem(response="r", prompt="p", columns={"harmful": 1})
    judge = _judge(server, prompt=build, to_scores=wildguard_verdict())
    out = judge.judge_batch([harmful])
    assert (out[0].user, out[0].llm) == (0.0, 1.0) and seen == [None]
    assert server.bodies[-1]["messages"][0] == {"role": "system", "content": "judge"}
    crashing = _judge(server, prompt=lambda item: 1 / 0)
    assert crashing.judge_one(harmful).failed
    bad_mapping = _judge(server, prompt="MODE=ok:1", to_scores=lambda v, item: 1 / 0)
    assert bad_mapping.judge_one(harmful).failed


def test_client_endpoint_forms():
    assert OpenAIJudge("http://h:1", "m").url == "http://h:1/v1/chat/completions"
    assert OpenAIJudge("http://h:1/v1/", "m").url == "http://h:1/v1/chat/completions"
    assert OpenAIJudge("http://h:1/x/chat/completions", "m").url == "http://h:1/x/chat/completions"
    with pytest.raises(ValueError):
        OpenAIJudge("http://h:1", "m", concurrency=0)
    assert OpenAIJudge("http://h:1", "m").judge_batch([]) == []


def test_client_as_reward_judge_in_training_loop_never_raises(server):
    judge = _judge(server, timeout=0.4)  # "slow" answers after 1 s
    items = _items("MODE=ok:1", "MODE=slow", "MODE=always500", "MODE=malformed", "MODE=unknown")
    out = run_judge(judge, items)
    assert [s.failed for s in out] == [False, True, True, True, True]
    assert server.requests < MAX_REQUESTS



@pytest.mark.parametrize("mode", ["trickle_headers", "trickle_body"])
def test_client_timeout_is_a_deadline_for_the_whole_request(server, mode):
    judge = _judge(server, timeout=0.5, max_retries=0)
    judge.judge_batch(_items("MODE=ok:1"))  # start the client outside the timed call
    start = time.perf_counter()
    out = judge.judge_batch(_items(f"MODE={mode}", f"MODE={mode} ID=2"))
    elapsed = time.perf_counter() - start
    assert all(s.failed and s.user == 0.0 and "timeout" in s.detail for s in out)
    assert elapsed < 0.5 + 1.5  # slack for a loaded machine; the trickled reply alone takes ~3 s
    assert judge.stats.timeouts == 2 and judge.stats.failures == 2
    retrying = _judge(server, timeout=0.3, max_retries=1, backoff=0.01, concurrency=1)
    start = time.perf_counter()
    assert retrying.judge_one(_items(f"MODE={mode}")[0]).failed
    assert time.perf_counter() - start < 2 * 0.3 + 1.4  # two trickled attempts would take ~6 s
    assert retrying.stats.timeouts == 2 and retrying.stats.retries == 1


def test_client_does_not_follow_redirects_nor_leak_the_key(server):
    with serving(_FakeJudgeServer()) as other:
        host, port = other.server_address
        server.redirect_to = f"http://{host}:{port}/v1/chat/completions"
        judge = _judge(server, api_key="secret", max_retries=2)
        out = judge.judge_batch(_items("MODE=redirect", "MODE=ok:1"))
        assert out[0].failed and out[0].user == 0.0 and "302" in out[0].detail
        assert out[1].user == 1.0 and not out[1].failed  # one sample's failure is its own
        assert other.requests == 0 and other.auth == []  # the other origin never saw the key
        assert judge.stats.http_errors == 1 and judge.stats.failures == 1 and judge.stats.retries == 0


def test_client_retries_a_reply_cut_short_and_caps_replies(server):
    judge = _judge(server, max_retries=2, backoff=0.01)
    out = judge.judge_one(_items("MODE=cut")[0])
    assert out.failed and out.user == 0.0 and "connection" in out.detail
    stats = judge.stats
    assert stats.requests == 3 and stats.retries == 2 and stats.connection_errors == 3 and stats.malformed == 0
    # a reply over the size cap is malformed (not retried); no api_key: no Authorization header
    capped = _judge(server, max_reply_bytes=1000, max_retries=2)
    out = capped.judge_batch(_items("MODE=huge", "MODE=ok:1"))
    assert out[0].failed and "too large" in out[0].detail and not out[1].failed
    assert capped.stats.malformed == 1 and capped.stats.retries == 0
    assert set(server.auth) == {None}


def test_client_needs_the_openai_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(ImportError, match=r"gtalign_fast\[judge\]"):
        OpenAIJudge("http://127.0.0.1:1/v1", "m")
