"""Several OpenAI-compatible servers behind one engine: each request goes to the server
with the fewest requests in flight; a server that stops answering is taken out (its
request retried on the others at once) and probed again after a pause, and comes back
when it answers. Only when no server answers does a request fail.

Retries of a server's own refusals (429 and 5xx: busy, restarting) back off and count
against the request's budget (`engine.max_retries`); a dead server costs no budget while
another one is up.
"""

import contextlib
import logging
import random
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import httpx

from pipeline.errors import EngineError, TransientEngineError

log = logging.getLogger("prefloop.engines")

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
COUNTERS = ("requests", "failures", "completion_tokens", "busy_s")
# What the requests made in one context did, per server (`tally`): a stage's own share
# when several stages use the same engine at once.
_TALLY: ContextVar[dict[str, dict[str, float]] | None] = ContextVar("tally", default=None)
PROBE_AFTER_S = 2.0  # first pause before a dead server is asked again
PROBE_MAX_S = 30.0  # the pause doubles up to this


@dataclass
class Server:
    url: str
    client: httpx.Client
    in_flight: int = 0
    up: bool = True
    probe_at: float = 0.0
    pause: float = 0.0  # 0 = up; the pause before the next probe while it is down
    last_error: str = ""
    # Counters since the engine started (COUNTERS; a stage's own are its `tally`).
    requests: int = 0
    failures: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0


@dataclass
class ServerPool:
    servers: list[Server]
    max_retries: int = 4
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(
        cls, urls: list[str], headers: dict, timeout_s: float, per_server: int, max_retries: int
    ) -> "ServerPool":
        servers = [
            Server(
                url,
                httpx.Client(
                    base_url=url.rstrip("/"),
                    timeout=timeout_s,
                    headers=headers,
                    limits=httpx.Limits(max_connections=per_server),
                ),
            )
            for url in urls
        ]
        return cls(servers, max_retries)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def ping(self) -> None:
        """Before a run: fail at once, with one line, when no server answers; a server of
        several that does not answer is logged and left out until it does."""
        silent = []
        for s in self.servers:
            try:
                s.client.get("/models", timeout=10.0).raise_for_status()
            except httpx.HTTPError as e:
                silent.append((s, e))
        if len(silent) == len(self.servers):
            s, e = silent[0]
            where = s.url if len(self.servers) == 1 else ", ".join(self.urls)
            raise EngineError(
                f"engine.base_url: {where} does not answer ({e}); is the server running?"
            ) from None
        for s, e in silent:
            self._down(s, failure_reason(e))

    # -- choosing a server --------------------------------------------------------------

    def _pick(self, tried: set[str]) -> Server | None:
        """The up server with the fewest requests in flight (not yet tried by this
        request, when another one is left); a dead server whose pause is over is probed
        first and taken back when it answers."""
        now = time.monotonic()
        with self.lock:
            due = [s for s in self.servers if not s.up and s.probe_at <= now]
            for s in due:
                s.probe_at = now + s.pause  # one thread probes it; others pass by
        for s in due:
            self._probe(s)
        with self.lock:
            up = [s for s in self.servers if s.up]
            fresh = [s for s in up if s.url not in tried] or up
            if not fresh:
                return None
            low = min(s.in_flight for s in fresh)
            choice = random.choice([s for s in fresh if s.in_flight == low])
            choice.in_flight += 1
            return choice

    def _probe(self, s: Server) -> None:
        try:
            s.client.get("/models", timeout=2.0).raise_for_status()
        except httpx.HTTPError:
            with self.lock:
                s.pause = min(PROBE_MAX_S, s.pause * 2)
            return
        self._up(s)

    def _count(self, s: Server, **counts: float) -> None:
        """Add to the server's counters and to the calling context's tally."""
        tally = _TALLY.get()
        with self.lock:
            for key, n in counts.items():
                setattr(s, key, getattr(s, key) + n)
            if tally is not None:
                entry = tally.setdefault(s.url, dict.fromkeys(COUNTERS, 0))
                for key, n in counts.items():
                    entry[key] += n

    def _down(self, s: Server, reason: str) -> None:
        self._count(s, failures=1)
        with self.lock:
            s.last_error = reason
            if not s.up:
                return
            s.up, s.pause = False, PROBE_AFTER_S
            s.probe_at = time.monotonic() + s.pause
            left = sum(x.up for x in self.servers)
        log.warning(
            "server %s stopped answering (%s); its requests go to the %d other server(s) "
            "that answer",
            s.url,
            reason,
            left,
        )

    # -- one request --------------------------------------------------------------------

    def post(self, path: str, body: dict) -> dict:
        """POST to the least loaded server; see the module docstring for the retries."""
        tried: set[str] = set()
        budget = self.max_retries + 1
        attempt = 0
        free = 2 * len(self.servers)  # retries on another server that cost no budget
        while True:
            s = self._pick(tried)
            if s is None:
                # Nothing is up: ask the server that failed longest ago directly (a
                # restarted server is found without waiting for its probe), counting it.
                s = min(self.servers, key=lambda x: x.probe_at)
                with self.lock:
                    s.in_flight += 1
                counted = True
            else:
                counted = False
            tried.add(s.url)
            start = time.monotonic()
            try:
                response = s.client.post(path, json=body)
            except httpx.TransportError as e:
                self._release(s, start)
                self._down(s, failure_reason(e))
                if not counted and free > 0 and any(x.up for x in self.servers):
                    free -= 1
                    continue  # another server answers: no budget spent, no pause
                attempt += 1
                if attempt >= budget:
                    raise TransientEngineError(self._none_answers(attempt, e)) from None
            else:
                self._release(s, start)
                if response.status_code < 400:
                    self._up(s)
                    data = response.json()
                    tokens = (data.get("usage") or {}).get("completion_tokens") or 0
                    self._count(s, completion_tokens=tokens)
                    return data
                self._count(s, failures=1)
                attempt += 1
                if response.status_code not in RETRY_STATUS or attempt >= budget:
                    kind = (
                        TransientEngineError
                        if response.status_code in RETRY_STATUS
                        else EngineError
                    )
                    raise kind(f"{s.url}: HTTP {response.status_code}: {response.text[:200]}")
            time.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random()))

    def _release(self, s: Server, start: float) -> None:
        with self.lock:
            s.in_flight -= 1
        self._count(s, requests=1, busy_s=time.monotonic() - start)

    def _up(self, s: Server) -> None:
        if not s.up:
            with self.lock:
                s.up, s.pause = True, 0.0
            log.warning("server %s answers again; it takes requests", s.url)

    def _none_answers(self, tries: int, e: Exception) -> str:
        if len(self.servers) == 1:
            s = self.servers[0]
            return f"{s.url}: {s.last_error} after {tries} tries ({e}); is the server running?"
        each = "; ".join(f"{s.url}: {s.last_error or 'no answer'}" for s in self.servers)
        return (
            f"engine.base_url: none of the {len(self.servers)} servers answers after "
            f"{tries} tries ({each}); are the servers running?"
        )

    def snapshot(self) -> dict[str, dict]:
        """Per server: requests, failures, completion tokens, seconds busy (summed over
        concurrent requests), and whether it answers now."""
        with self.lock:
            return {
                s.url: {**{key: getattr(s, key) for key in COUNTERS}, "up": s.up}
                for s in self.servers
            }

    def close(self) -> None:
        for s in self.servers:
            s.client.close()


def failure_reason(e: httpx.HTTPError) -> str:
    """Why a server did not answer, in a few words."""
    if isinstance(e, httpx.HTTPStatusError):
        return f"HTTP {e.response.status_code}"
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    if isinstance(e, httpx.ConnectError):
        return "cannot connect"
    return "lost the connection"


@contextlib.contextmanager
def tally() -> Iterator[dict[str, dict[str, float]]]:
    """Per server, what the requests made inside this block did (the engine's request
    threads run in a copy of the caller's context, so they count here)."""
    counts: dict[str, dict[str, float]] = {}
    token = _TALLY.set(counts)
    try:
        yield counts
    finally:
        _TALLY.reset(token)


def server_rows(counts: dict[str, dict[str, float]], up: dict[str, bool], wall: float):
    """A stage's per-server rows (every server of its engines, idle ones included), with
    completion tokens/s over the stage's wall time."""
    rows = []
    for url in sorted(set(counts) | set(up)):
        c = counts.get(url, dict.fromkeys(COUNTERS, 0))
        rows.append(
            {
                "server": url,
                "requests": int(c["requests"]),
                "failures": int(c["failures"]),
                "completion_tokens": int(c["completion_tokens"]),
                "busy_s": round(c["busy_s"], 3),
                "tokens_per_s": c["completion_tokens"] / wall if wall > 0 else None,
                "up": up.get(url),
            }
        )
    return rows
