"""GRPOTrainer against a misbehaving judge server (issue 15): nothing is lost, steps stay bounded.

A tiny toy-game trainer (tests/test_trainer.py) is scored by a GTAlign reward whose judge is an
:class:`OpenAIJudge` pointed at a local ``http.server`` on 127.0.0.1. Per request the server, by the
``MODE=`` word in the judged response, answers normally, trickles its reply a byte at a time,
redirects (302) to a second local server, resets the connection, or sends a body cut short of its
Content-Length. Each training batch holds every kind, so every step meets every fault.

What must hold: the steps complete; each failing sample is a missing score, advantage 0, and is
counted (GTAlignReward flags it ``judge_failed``: ``gtalign/judge_failures`` and
``rewards/<name>/failures``; a reward that returns None: ``rewards/<name>/failures``); the good
samples' verdicts drive the advantages; a judge that fails on more than
``GRPOConfig.max_judge_failure_rate`` of a step's samples stops the run with an error naming it; a
step takes at most about ``timeout x attempts`` more than a clean one; the redirect target never
gets a request (so never the key); ``metrics.jsonl`` holds every step once, across a resume too.

The kill during a checkpoint write is tests/test_trainer_reliability.py's.
"""

from __future__ import annotations

import http.server
import json
import math
import re
import socket
import struct
import threading
import time

import pytest
import torch

from gtalign_fast import GRPOTrainer
from gtalign_fast.game import GTAlignReward, JudgeItem, OpenAIJudge
from tests.servers import serving, write_slowly
from tests.test_trainer import install_missing_ops, read_metrics, toy

pytestmark = pytest.mark.timeout(120)

# The judge's deadline per attempt: far above a good reply's time even on a loaded 2-core CI machine
# (at 0.3 s a retried request sometimes timed out before the server had read it), far below the
# ~8 s a trickled reply takes.
TIMEOUT = 1.0
RETRIES = 1  # so each faulty sample costs at most 2 attempts
BACKOFF = 0.01
GROUP = 8  # toy_config's num_generations
BATCH = 16  # two prompts x 8 completions per step
# one group's completions, by position; the two groups of a batch are alike
MODES = ("ok:1", "trickle", "ok:0", "redirect", "ok:1", "reset", "ok:0", "cut")
FAULTS = ("trickle", "redirect", "reset", "cut")
GOOD = [i for i in range(BATCH) if MODES[i % GROUP].startswith("ok")]
BAD = [i for i in range(BATCH) if MODES[i % GROUP] in FAULTS]
MAX_REQUESTS = 2000  # a runaway client gets 503s, not an endless test

MATRIX = (
    '{"DQ_AQ": {"LLM": 2.1, "user": 2.4}, "DQ_CQ": {"LLM": 1.2, "user": 0.8}, "DQ_DA": {"LLM": 3.8, "user": 4.1}, '
    '"VQ_AQ": {"LLM": 1.5, "user": 1.9}, "VQ_CQ": {"LLM": 1.0, "user": 1.3}, "VQ_DA": {"LLM": 2.0, "user": 2.0}}'
)


@pytest.fixture(autouse=True)
def _ops(monkeypatch):
    install_missing_ops(monkeypatch)


# ---------------------------------------------------------------------------------------------
# The judge server


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # socketserver's 5 drops SYNs of a 16-wide batch: a 1 s retransmit, a false timeout

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests = 0
        self.modes: list[str] = []
        self.auth: list[str | None] = []
        self.redirect_to = ""


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args):
        pass

    def _record(self) -> int:
        with self.server.lock:
            self.server.requests += 1
            self.server.auth.append(self.headers.get("Authorization"))
            return self.server.requests

    def _send(self, raw: bytes) -> None:
        try:
            self.wfile.write(raw)
        except OSError:
            pass
        self.close_connection = True

    def _reply(self, code: int, body: bytes, headers: dict | None = None) -> None:
        head = f"HTTP/1.1 {code} X\r\nConnection: close\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._send(head.encode() + b"\r\n" + body)

    @staticmethod
    def _chat(content: str) -> bytes:
        return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()

    def do_GET(self):  # only a followed redirect would get here
        self._record()
        self._reply(200, self._chat("<score>1</score>"))

    def do_POST(self):
        count = self._record()
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        mode = re.search(r"MODE=(\S+)", body["messages"][-1]["content"]).group(1)
        with self.server.lock:
            self.server.modes.append(mode)
        if count > MAX_REQUESTS:
            return self._reply(503, b"{}")
        if mode.startswith("ok:"):
            return self._reply(200, self._chat(f"fine\n<score>{mode[3:]}</score>"))
        if mode == "trickle":  # ~8 s in all at 20 bytes/s; the judge's deadline is TIMEOUT
            answer = self._chat("<score>1</score>")
            raw = f"HTTP/1.1 200 OK\r\nContent-Length: {len(answer)}\r\n\r\n".encode() + answer
            write_slowly(self.wfile, raw)
            self.close_connection = True
            return None
        if mode == "redirect":
            return self._reply(302, b"", {"Location": self.server.redirect_to})
        if mode == "reset":  # no reply at all: an RST
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return None
        if mode == "cut":  # promise 500 bytes, send 20, hang up
            return self._send(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n" + self._chat("<score>1</score>")[:20])
        return self._reply(404, b"{}")


@pytest.fixture
def servers():
    """(the judge server, the redirect target), both on 127.0.0.1."""
    with serving(_Server()) as judge_srv, serving(_Server()) as other:
        host, port = other.server_address
        judge_srv.redirect_to = f"http://{host}:{port}/v1/chat/completions"
        yield judge_srv, other


@pytest.fixture
def judge(servers):
    host, port = servers[0].server_address
    client = OpenAIJudge(f"http://{host}:{port}/v1", "judge-model", prompt="{response}", api_key="secret",
                         timeout=TIMEOUT, max_retries=RETRIES, backoff=BACKOFF, concurrency=BATCH)
    try:
        yield client
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------
# Rewards over the judge: the toy model's words are not GTAlign chains, so each completion is
# replaced by a chain whose response carries its position's server mode


def _chain(response: str) -> str:
    return (f"<thinking>The question is clear.</thinking><payoff>{MATRIX}</payoff>"
            f"<analyze>Choose DQ_DA.</analyze><response>{response}</response>")


def _judged_texts(n: int, calls: int) -> list[str]:
    assert n == BATCH, n
    return [_chain(f"MODE={MODES[i % GROUP]} ID={calls}-{i}") for i in range(n)]


class GTAlignOverJudge:
    """GTAlignReward (Cobb-Douglas, U and L to the welfare op) on the mode chains; keeps its batches."""

    welfare_reward = True
    alpha = 0.5
    __name__ = "gtalign"

    def __init__(self, judge: OpenAIJudge) -> None:
        self.inner = GTAlignReward(judge)
        self.batches: list = []

    def __call__(self, prompts, completions, completion_ids, **columns):
        out = self.inner(prompts=prompts, completions=_judged_texts(len(completions), len(self.batches)))
        self.batches.append(out)
        return out


class VerdictOrNone:
    """A plain reward: the judge's verdict, None (-> NaN -> advantage 0) when the judge failed."""

    __name__ = "verdict"

    def __init__(self, judge: OpenAIJudge) -> None:
        self.judge = judge
        self.batches: list = []

    def __call__(self, prompts, completions, completion_ids, **columns):
        items = [JudgeItem(response=re.search(r"<response>(.*)</response>", t).group(1))
                 for t in _judged_texts(len(completions), len(self.batches))]
        scores = self.judge.judge_batch(items)
        out = [None if s.failed else s.user for s in scores]
        self.batches.append(out)
        return out


def _trainer(tmp_path, reward, steps: int) -> GRPOTrainer:
    tokenizer = toy.build_tokenizer()
    args = toy.toy_config(str(tmp_path / "run"), steps, per_device_train_batch_size=BATCH, shuffle_dataset=False,
                          save_steps=1)
    return GRPOTrainer(toy.build_model(tokenizer, 0), [reward], args=args, train_dataset=toy.build_dataset(64, 0),
                       processing_class=tokenizer)


def _instrument(trainer: GRPOTrainer, seconds: list, advantages: list) -> None:
    """Record each step's wall time and each rollout's advantages."""
    step, advantage = trainer._training_step, trainer._advantages

    def timed_step():
        start = time.perf_counter()
        try:
            return step()
        finally:
            seconds.append(time.perf_counter() - start)

    def recorded(scores):
        out = advantage(scores)
        advantages.append(out[0].detach().cpu().clone())
        return out

    trainer._training_step = timed_step
    trainer._advantages = recorded


# A clean step of the toy model takes well under a second here; a faulty sample costs at most
# (1 + RETRIES) deadlines plus the backoff, and all of a batch's samples are judged at once.
STEP_BOUND = (1 + RETRIES) * TIMEOUT + BACKOFF + 5.0


def _check_server_side(servers, judge: OpenAIJudge, steps: int) -> None:
    judge_srv, other = servers
    assert other.requests == 0 and other.auth == [], "the redirect was followed (the key could leak)"
    assert set(judge_srv.auth) == {"Bearer secret"}
    # Answered at once and never retried: every request reaches the server.
    answered = {"ok:1": 4, "ok:0": 4, "redirect": 2}
    assert {m: judge_srv.modes.count(m) for m in answered} == {m: steps * k for m, k in answered.items()}
    # Retried once (2 samples per group x 2 groups x 2 attempts): a retry the client abandons at its
    # deadline may not have been read by the server yet, so the server sees between one and two
    # attempts per sample; the client's own counts below are exact.
    for mode in ("trickle", "reset", "cut"):
        assert steps * 2 <= judge_srv.modes.count(mode) <= steps * 4, (mode, judge_srv.modes.count(mode))
    stats = judge.stats
    assert stats.items == steps * BATCH and stats.failures == steps * len(BAD)
    assert stats.timeouts == steps * 4 and stats.http_errors == steps * 2
    assert stats.connection_errors == steps * 8 and stats.retries == steps * 6


def test_gtalign_reward_survives_a_faulty_judge_and_resumes(tmp_path, servers, judge):
    seconds, advantages = [], []
    reward = GTAlignOverJudge(judge)
    first = _trainer(tmp_path, reward, steps=2)
    _instrument(first, seconds, advantages)
    first.train()
    resumed = _trainer(tmp_path, reward, steps=3)  # a new process would do the same: resume from checkpoint-2
    _instrument(resumed, seconds, advantages)
    resumed.train(resume_from_checkpoint=True)

    assert resumed.step == 3 and len(reward.batches) == 3 and len(advantages) == 3
    rows = read_metrics(resumed)
    assert [row["step"] for row in rows] == [1, 2, 3], "metrics.jsonl must hold every step once"
    for row in rows:
        # a judge failure is a missing score (half the step: not more than max_judge_failure_rate = 0.5)
        assert row["gtalign/judge_failures"] == len(BAD) == row["welfare/judge_failures"]
        assert row["gtalign/judge_failure_rate"] == 0.5
        assert row["rewards/gtalign/failures"] == len(BAD) and row["welfare/hard_failures"] == 0
        assert all(math.isfinite(row[k]) for k in ("loss", "reward", "welfare/U", "welfare/L", "welfare/W"))
    for batch, advantage in zip(reward.batches, advantages):
        flags = [f["judge_failed"] for f in batch.fields]
        assert flags == [i in BAD for i in range(BATCH)] == batch.judge_failed
        assert batch.failed_judges == {repr(judge): len(BAD)}
        answers = [f["answer_reward"] for f in batch.fields]
        assert answers[:GROUP] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0] == answers[GROUP:]
        # missing, not 0: advantage 0, and the group's statistics are the good verdicts' only
        assert torch.equal(advantage[BAD], torch.zeros(len(BAD)))
        ones = [i for i in GOOD if MODES[i % GROUP] == "ok:1"]
        zeros = [i for i in GOOD if MODES[i % GROUP] == "ok:0"]
        assert bool((advantage[ones] > 0).all()) and bool((advantage[zeros] < 0).all())
        good_w = torch.tensor([math.sqrt(batch.user[i] * batch.llm[i]) for i in GOOD[:4]], dtype=torch.float64)
        expected = (good_w - good_w.mean()) / (good_w.std() + trainer_eps(resumed))
        torch.testing.assert_close(advantage[GOOD[:4]].double(), expected, rtol=1e-4, atol=1e-5)
    assert max(seconds) < STEP_BOUND, seconds
    _check_server_side(servers, judge, steps=3)


def trainer_eps(trainer: GRPOTrainer) -> float:
    return trainer.args.advantage_eps


def test_a_dead_judge_stops_the_run_with_its_name_and_rate(tmp_path):
    """Every request refused (nothing listens on port 9): 16 of 16 failures > max_judge_failure_rate = 0.5
    stop the first step, before any update, with an error naming the judge and the rate; 1.0 never stops."""
    dead = OpenAIJudge("http://127.0.0.1:9/v1", "dead-judge", prompt="{response}", timeout=TIMEOUT, max_retries=0)
    try:
        trainer = _trainer(tmp_path, GTAlignOverJudge(dead), steps=2)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        with pytest.raises(RuntimeError, match=r"judge failed on 16 of 16 completions .*\(100%\).*"
                                               r"max_judge_failure_rate = 0\.5.*OpenAIJudge\(model='dead-judge'"):
            trainer.train()
        assert trainer.step == 0
        assert all(torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))
        tolerant = _trainer(tmp_path / "tolerant", GTAlignOverJudge(dead), steps=1)
        tolerant.args.max_judge_failure_rate = 1.0
        advantages: list = []
        _instrument(tolerant, [], advantages)
        tolerant.train()
        assert torch.equal(advantages[0], torch.zeros(BATCH))  # nothing to learn from: every score missing
        assert read_metrics(tolerant)[0]["gtalign/judge_failures"] == BATCH
    finally:
        dead.close()


def test_a_reward_returning_none_on_judge_failure_gets_advantage_zero(tmp_path, servers, judge):
    seconds, advantages = [], []
    reward = VerdictOrNone(judge)
    trainer = _trainer(tmp_path, reward, steps=2)
    _instrument(trainer, seconds, advantages)
    trainer.train()

    rows = read_metrics(trainer)
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["rewards/verdict/failures"] == len(BAD)  # None -> NaN: a counted failure
        assert row["rewards/verdict/mean"] == pytest.approx(0.5)  # the good verdicts only: 1, 0, 1, 0
        assert math.isfinite(row["loss"]) and row["reward"] == pytest.approx(0.5)
    for batch, advantage in zip(reward.batches, advantages):
        assert [i for i, v in enumerate(batch) if v is None] == BAD
        assert torch.equal(advantage[BAD], torch.zeros(len(BAD)))  # the trainer's rule for NaN
        ones = [i for i in GOOD if MODES[i % GROUP] == "ok:1"]
        zeros = [i for i in GOOD if MODES[i % GROUP] == "ok:0"]
        assert bool((advantage[ones] > 0).all()) and bool((advantage[zeros] < 0).all())
    assert max(seconds) < STEP_BOUND, seconds
    _check_server_side(servers, judge, steps=2)
