"""A judge model behind any OpenAI-compatible ``/v1/chat/completions`` server.

:class:`OpenAIJudge` asks the judge model about each item through the ``openai`` SDK's async client
(the optional extra ``gtalign_fast[judge]``) run on a private event loop, and reads its verdict with
a regular expression; the verdict becomes an :class:`~.base.AnswerScore` through a mapper such as
:func:`~.verdicts.scaled_verdict` (a 0..scale grade) or :func:`~.verdicts.wildguard_verdict` (the
harmful / harmless rule). The prompt, the verdict pattern and the mappers live in :mod:`.verdicts`;
this module is the client. Each attempt has a hard deadline (``timeout`` bounds the whole request, however slowly the
server sends), redirects are never followed (credentials never leave the configured origin), the
reply size read is capped, and timeouts, connection errors (a reply cut short included), HTTP
408/409/425/429/5xx and, if asked, replies without a verdict are retried with backoff. Every failure
is counted in :class:`JudgeStats` and ends as a failed 0 score for that item only: nothing raises
to the caller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import math
import os
import random
import re
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .base import AnswerScore, JudgeItem, _coerce_score
from .verdicts import (
    DEFAULT_JUDGE_PROMPT,
    DEFAULT_VERDICT_PATTERN,
    MalformedReply,
    judge_messages,
    read_verdict,
    scaled_verdict,
)

__all__ = ["JudgeStats", "OpenAIJudge"]


@dataclass
class JudgeStats:
    """Counters of an :class:`OpenAIJudge` (a snapshot; see :attr:`OpenAIJudge.stats`).

    ``requests`` counts HTTP attempts; ``items`` judged items; ``failures`` items scored 0 because no
    verdict was obtained; ``retries`` extra attempts; the rest count what went wrong per attempt.
    """

    items: int = 0
    requests: int = 0
    failures: int = 0
    retries: int = 0
    timeouts: int = 0
    http_errors: int = 0
    connection_errors: int = 0
    malformed: int = 0


class _RetryableError(Exception):
    pass


class _FatalError(Exception):
    pass


_EXTRA_HINT = "OpenAIJudge needs the openai SDK: pip install 'gtalign_fast[judge]' (or pip install 'openai>=1.50')"


def _import_openai() -> Any:
    try:
        import openai
    except ImportError as exc:
        raise ImportError(_EXTRA_HINT) from exc
    return openai


class _ReplyTooLarge(Exception):
    pass


def _capped_stream_type(base: type) -> type:
    """A subclass of the HTTP library's ``AsyncByteStream`` that raises past ``cap`` bytes."""

    class _CappedStream(base):
        def __init__(self, stream: Any, cap: int) -> None:
            self._stream = stream
            self._cap = cap

        async def __aiter__(self):
            size = 0
            async for chunk in self._stream:
                size += len(chunk)
                if size > self._cap:
                    raise _ReplyTooLarge("reply too large")
                yield chunk

        async def aclose(self) -> None:
            await self._stream.aclose()

    return _CappedStream


class _Runtime:
    """A private event loop on a daemon thread, and the async SDK client that lives on it."""

    def __init__(self, make_client: Callable[[], Any]) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="openai-judge-loop", daemon=True)
        self.thread.start()
        self.client = asyncio.run_coroutine_threadsafe(self._make(make_client), self.loop).result(timeout=60)

    @staticmethod
    async def _make(make_client: Callable[[], Any]) -> Any:
        client = make_client()
        client.chat.completions.with_streaming_response  # the SDK's lazy imports, outside any deadline
        return client

    def submit(self, coro: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if os.getpid() != self.pid or self.loop.is_closed():
            return
        if threading.current_thread() is self.thread:  # cannot wait for ourselves; just stop
            self.loop.stop()
            return
        try:
            self.submit(self.client.close()).result(timeout=2)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=2)
        if not self.thread.is_alive():
            self.loop.close()


class OpenAIJudge:
    """Ask a judge model behind an OpenAI-compatible server and read its verdict.

    Requests go to ``{base_url}/chat/completions`` (``/v1`` is added when ``base_url`` lacks it)
    through the ``openai`` SDK's async client (extra ``gtalign_fast[judge]``; a missing SDK raises
    :class:`ImportError` here, at construction) on a private event loop, at most ``concurrency`` at
    a time. Guarantees, whatever the server does:

    - ``timeout`` is a deadline for a whole attempt (connect, headers and body), not a per-read
      timeout: a server that trickles its reply is cut off at ``timeout``; a ``judge_batch`` call
      is bounded by the attempts, backoffs and concurrency (and a batch-wide deadline on top);
    - redirects are never followed (a 3xx is a failed, non-retried attempt), so the API key is only
      ever sent to ``base_url``'s origin;
    - at most ``max_reply_bytes`` of a reply (error replies included) are read;
    - timeouts, connection errors (a reply cut short of its Content-Length included) and HTTP
      408/409/425/429/5xx are retried with exponential backoff (replies without a verdict too, if
      asked); an item without a verdict after the retries is scored 0 (``failed=True``) and counted
      in :attr:`stats`. One item's failure never affects another's; nothing raises to the caller.

    Parameters
    ----------
    base_url : str
        e.g. ``"http://127.0.0.1:30000/v1"``.
    model : str
        The ``model`` field of the request.
    prompt : str or callable
        A template formatted with the fields ``prompt, reference, response, completion,
        data_source`` (missing fields are empty; write literal braces as ``{{ }}``), or a callable
        ``item -> str | list[dict]`` (a user message, or the whole ``messages`` list).
    verdict_pattern : str
        Regular expression; the first non-empty group of its *last* match is the verdict (a number).
    to_scores : callable, optional
        ``(verdict, item) -> AnswerScore | float``; default :func:`~.verdicts.scaled_verdict` with ``scale``.
    scale : float
        Divides the verdict when ``to_scores`` is not given (4 for a 0..4 helpfulness score).
    api_key : str, optional
        Sent as ``Authorization: Bearer`` (to ``base_url``'s origin only). ``None`` sends no
        ``Authorization`` header (``OPENAI_API_KEY`` is not read).
    concurrency : int
        Requests in flight at once (shared by all the items of a batch).
    timeout : float
        Deadline in seconds for each attempt, from connect to the last byte of the reply.
    max_retries : int
        Extra attempts after the first.
    backoff, backoff_max : float
        Sleep ``min(backoff_max, backoff * 2**k)`` (+ up to 10% jitter) before retry k+1.
    retry_malformed : bool
        Also retry when the reply has no verdict (useful with sampling judges; off by default).
    max_tokens, temperature : optional
        Sent when given.
    extra_body : dict, optional
        Merged into the request body (e.g. ``{"chat_template_kwargs": {"enable_thinking": False}}``).
    max_reply_bytes : int
        Replies larger than this count as malformed (reading stops there).
    sleep : callable
        The backoff sleep; ``time.sleep`` (the default) becomes a non-blocking ``asyncio.sleep``.
        Any other callable is called on the judge's event loop and may return an awaitable (tests).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        prompt: str | Callable[[JudgeItem], str | list[dict]] = DEFAULT_JUDGE_PROMPT,
        verdict_pattern: str = DEFAULT_VERDICT_PATTERN,
        to_scores: Callable[[float, JudgeItem], Any] | None = None,
        scale: float = 1.0,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        retry_malformed: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
        extra_body: Mapping[str, Any] | None = None,
        max_reply_bytes: int = 4_000_000,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        self._openai = _import_openai()
        if concurrency < 1 or max_retries < 0 or not timeout > 0 or not math.isfinite(timeout):
            raise ValueError("concurrency >= 1, max_retries >= 0 and a finite timeout > 0 are required")
        self.url = self._endpoint(base_url)
        self.model = model
        self.prompt = prompt
        self.verdict_re = re.compile(verdict_pattern)
        self.to_scores = to_scores or scaled_verdict(scale)
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.retry_malformed = retry_malformed
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.extra_body = dict(extra_body or {})
        self.max_reply_bytes = max_reply_bytes
        self._sleep = sleep
        self._lock = threading.Lock()
        self._stats = JudgeStats()
        self._jitter = random.Random(0)
        self._runtime: _Runtime | None = None
        self._finalizer: Any = None

    def __repr__(self) -> str:  # names the judge in errors and logs; never the API key
        return f"OpenAIJudge(model={self.model!r}, url={self.url!r})"

    @staticmethod
    def _endpoint(base_url: str) -> str:
        url = base_url.rstrip("/")
        if url.endswith("/chat/completions"):
            return url
        if not url.endswith("/v1"):
            url += "/v1"
        return url + "/chat/completions"

    # -- stats ------------------------------------------------------------------------------------

    @property
    def stats(self) -> JudgeStats:
        """A snapshot of the counters."""
        with self._lock:
            return JudgeStats(**vars(self._stats))

    def reset_stats(self) -> None:
        """Zero the counters."""
        with self._lock:
            self._stats = JudgeStats()

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self._stats, name, getattr(self._stats, name) + amount)

    # -- public -----------------------------------------------------------------------------------

    def judge_batch(self, items: Sequence[JudgeItem]) -> list[AnswerScore]:
        """Score items concurrently (order kept); never raises; bounded in time (see the class)."""
        items = list(items)
        if not items:
            return []
        bound = self._batch_bound(len(items))
        try:
            future = self._runtime_or_start().submit(self._judge_all(items, bound))
        except Exception as exc:
            detail = f"judge client unavailable: {type(exc).__name__}: {exc}"[:500]
            self._count("items", len(items))
            self._count("failures", len(items))
            return [AnswerScore.failure(detail) for _ in items]
        try:
            return future.result(timeout=bound + 10.0)
        except Exception as exc:  # the batch deadline inside should fire first; this is a backstop
            future.cancel()
            detail = f"judge batch did not finish: {type(exc).__name__}"
            self._count("failures", len(items))
            return [AnswerScore.failure(detail) for _ in items]

    def judge_one(self, item: JudgeItem) -> AnswerScore:
        """Score one item; never raises."""
        return self.judge_batch([item])[0]

    def ask(self, text: str) -> str | None:
        """Send one user message and return the reply's content (``None`` on failure)."""
        try:
            future = self._runtime_or_start().submit(self._attempt([{"role": "user", "content": text}]))
            return future.result(timeout=self.timeout + 10.0)
        except Exception:
            return None

    def close(self) -> None:
        """Close the HTTP client and stop the private event loop (a later call starts new ones)."""
        runtime, self._runtime = self._runtime, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if runtime is not None:
            runtime.close()

    def __enter__(self) -> "OpenAIJudge":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_openai=None, _lock=None, _runtime=None, _finalizer=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._openai = _import_openai()
        self._lock = threading.Lock()

    # -- the event loop and the SDK client --------------------------------------------------------

    def _runtime_or_start(self) -> _Runtime:
        with self._lock:
            runtime = self._runtime
            if runtime is not None and runtime.pid == os.getpid() and runtime.thread.is_alive():
                return runtime
            runtime = self._runtime = _Runtime(self._make_client)
            self._finalizer = weakref.finalize(self, runtime.close)
            return runtime

    def _make_client(self) -> Any:
        """The SDK client: no SDK retries (ours are counted), no redirects, a capped reply stream."""
        openai = self._openai
        cap = self.max_reply_bytes

        http_client = openai.DefaultAsyncHttpxClient(follow_redirects=False, timeout=self.timeout)
        # httpx for openai 1.x, httpx2 for later versions: whichever the SDK's client is built on
        http_module = sys.modules[type(http_client).__mro__[1].__module__.split(".")[0]]
        capped = _capped_stream_type(http_module.AsyncByteStream)

        async def cap_reply(response: Any) -> None:
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > cap:
                raise _ReplyTooLarge("reply too large")
            response.stream = capped(response.stream, cap)

        http_client.event_hooks = {"response": [cap_reply], "request": []}
        self._http_timeout_errors = (http_module.TimeoutException,)
        self._http_transport_errors = (http_module.TransportError,)
        # without api_key the SDK gets a placeholder that is never sent (see _request)
        return openai.AsyncOpenAI(
            api_key=self.api_key or "no-key", base_url=self.url[: -len("/chat/completions")], max_retries=0,
            timeout=self.timeout, http_client=http_client,
        )

    def _batch_bound(self, n: int) -> float:
        attempts = n * (self.max_retries + 1)
        waves = math.ceil(attempts / self.concurrency)
        sleeps = sum(min(self.backoff_max, self.backoff * 2.0**k) * 1.1 for k in range(self.max_retries))
        return waves * self.timeout + sleeps + 1.0

    # -- async internals --------------------------------------------------------------------------

    async def _judge_all(self, items: list[JudgeItem], bound: float) -> list[AnswerScore]:
        gate = asyncio.Semaphore(self.concurrency)
        results: list[AnswerScore | None] = [None] * len(items)

        async def one(index: int) -> None:
            results[index] = await self._judge_item(items[index], gate)

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(items))]
        _, pending = await asyncio.wait(tasks, timeout=bound)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        out = []
        for result in results:
            if result is None:  # cancelled by the batch deadline (or crashed: never raise)
                self._count("failures")
                result = AnswerScore.failure("judge batch deadline")
            out.append(result)
        return out

    async def _judge_item(self, item: JudgeItem, gate: asyncio.Semaphore) -> AnswerScore:
        self._count("items")
        try:
            messages = judge_messages(self.prompt, item)
        except Exception as exc:
            self._count("failures")
            return AnswerScore.failure(f"cannot build the prompt: {type(exc).__name__}: {exc}"[:500])
        detail = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                await self._pause(self._delay(attempt - 1))
            try:
                async with gate:
                    reply = await self._attempt(messages)
                verdict = read_verdict(self.verdict_re, reply)
            except _RetryableError as exc:
                detail = str(exc)
                continue
            except MalformedReply as exc:
                self._count("malformed")
                detail = str(exc)
                if self.retry_malformed:
                    continue
                break
            except _FatalError as exc:
                detail = str(exc)
                break
            except Exception as exc:  # anything unexpected: do not retry, do not raise
                detail = f"{type(exc).__name__}: {exc}"[:500]
                break
            try:
                return _coerce_score(self.to_scores(verdict, item))
            except Exception as exc:
                detail = f"to_scores raised {type(exc).__name__}: {exc}"[:500]
                break
        self._count("failures")
        return AnswerScore.failure(detail)

    async def _pause(self, delay: float) -> None:
        if self._sleep is time.sleep:
            await asyncio.sleep(delay)
            return
        result = self._sleep(delay)
        if inspect.isawaitable(result):
            await result

    async def _attempt(self, messages: list[dict]) -> str:
        """One HTTP attempt under the deadline; returns the reply content or raises a private error."""
        openai = self._openai
        self._count("requests")
        try:
            raw = await asyncio.wait_for(self._request(messages), self.timeout)
        except asyncio.TimeoutError:
            self._count("timeouts")
            raise _RetryableError(f"timeout: no complete reply within {self.timeout:g}s") from None
        except _ReplyTooLarge:
            raise MalformedReply("reply too large") from None
        except openai.APITimeoutError:
            self._count("timeouts")
            raise _RetryableError("timeout: request timed out") from None
        except openai.APIStatusError as exc:
            self._count("http_errors")
            code = exc.status_code
            if 300 <= code < 400:
                raise _FatalError(f"HTTP {code}: redirect not followed (credentials stay with the judge)") from None
            if code in (408, 409, 425, 429) or code >= 500:
                raise _RetryableError(f"HTTP {code}") from None
            raise _FatalError(f"HTTP {code}") from None
        except openai.APIConnectionError as exc:
            if isinstance(exc.__cause__, _ReplyTooLarge):
                raise MalformedReply("reply too large") from None
            if isinstance(exc.__cause__, self._http_timeout_errors):
                self._count("timeouts")
                raise _RetryableError("timeout: request timed out") from None
            self._count("connection_errors")
            raise _RetryableError(f"connection error: {type(exc.__cause__ or exc).__name__}") from None
        except self._http_timeout_errors as exc:
            self._count("timeouts")
            raise _RetryableError(f"timeout: {type(exc).__name__}") from None
        except (self._http_transport_errors + (ConnectionError, OSError)) as exc:  # e.g. a reply cut short
            self._count("connection_errors")
            raise _RetryableError(f"connection error: {type(exc).__name__}: {exc}"[:500]) from None
        return self._content(raw)

    async def _request(self, messages: list[dict]) -> bytes:
        kwargs: dict[str, Any] = {}
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        if not self.api_key:
            kwargs["extra_headers"] = {"Authorization": self._openai.Omit()}
        client = self._runtime.client
        async with client.chat.completions.with_streaming_response.create(
            model=self.model, messages=messages, **kwargs
        ) as response:
            chunks, size = [], 0
            async for chunk in response.iter_bytes():
                size += len(chunk)
                if size > self.max_reply_bytes:
                    raise _ReplyTooLarge("reply too large")
                chunks.append(chunk)
        return b"".join(chunks)

    # -- helpers ----------------------------------------------------------------------------------

    def _delay(self, retry_index: int) -> float:
        base = min(self.backoff_max, self.backoff * (2.0**retry_index))
        with self._lock:
            return base * (1.0 + 0.1 * self._jitter.random())

    @staticmethod
    def _content(raw: bytes) -> str:
        try:
            payload = json.loads(raw.decode("utf-8", errors="replace"))
            content = payload["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise MalformedReply("reply is not a chat completion") from None
        if not isinstance(content, str):
            raise MalformedReply("reply has no text content")
        return content
