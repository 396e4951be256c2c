"""Session data: `prepare` (raw logs -> session text), loading, prefix samples, batches.

Session text: one session per line, item ids (1..N, contiguous) separated by spaces, in
click order; sessions in chronological order. A data folder holds train.txt, test.txt
and optionally stats.json (which records the protocol; without it: the DSAN protocol).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TEST_DAYS = 7
SECONDS_PER_DAY = 86_400
SESSION_GAP_SECONDS = 30 * 60
MIN_ITEM_COUNT = 5


@dataclass(frozen=True)
class Protocol:
    """Filters and prefix rule of a published preprocessing protocol (docs/dsan.md)."""

    name: str
    min_session_length: int  # shorter sessions are dropped, before and after item filtering
    min_prefix: int  # shortest input prefix of a sample


PROTOCOLS = {
    "dsan": Protocol("dsan", min_session_length=3, min_prefix=2),
    "srgnn": Protocol("srgnn", min_session_length=2, min_prefix=1),
}
DEFAULT_PROTOCOL = "dsan"


class DataError(ValueError):
    """A data file is malformed or yields nothing usable; the message names file and line."""


@dataclass
class RawSession:
    key: str  # session id in the raw file, for stable ordering
    end_time: float  # seconds since the epoch, of the last click
    items: list  # raw item ids, click order


# ---------------------------------------------------------------- protocol and writing


def apply_protocol(sessions: list[RawSession], protocol: Protocol, source: str):
    """Filter, split the last TEST_DAYS days off as test, renumber items 1..N by first use.

    Returns (train, test, info) where train/test are lists of id lists in chronological order.
    """
    m = protocol.min_session_length
    sessions = [s for s in sessions if len(s.items) >= m]
    counts = Counter(item for s in sessions for item in s.items)
    kept = []
    for s in sessions:
        items = [i for i in s.items if counts[i] >= MIN_ITEM_COUNT]
        if len(items) >= m:
            kept.append(RawSession(s.key, s.end_time, items))
    if not kept:
        raise DataError(f"{source}: no session left after the {protocol.name} filters "
                        f"(sessions >= {m} clicks, items seen >= {MIN_ITEM_COUNT} times)")
    kept.sort(key=lambda s: (s.end_time, s.key))
    last_time = kept[-1].end_time
    split_time = last_time - TEST_DAYS * SECONDS_PER_DAY
    train_raw = [s for s in kept if s.end_time <= split_time]
    test_raw = [s for s in kept if s.end_time > split_time]
    if not train_raw:
        raise DataError(f"{source}: no training session: all sessions fall in the last {TEST_DAYS} days")
    item_ids: dict = {}
    train = []
    for s in train_raw:
        train.append([item_ids.setdefault(i, len(item_ids) + 1) for i in s.items])
    test = []
    for s in test_raw:
        items = [item_ids[i] for i in s.items if i in item_ids]
        if len(items) >= m:
            test.append(items)
    if not test:
        raise DataError(f"{source}: no test session left (last {TEST_DAYS} days, items seen in training, "
                        f">= {m} clicks)")
    iso = lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()  # noqa: E731
    info = {
        "n_items": len(item_ids),
        "first_click_end": iso(kept[0].end_time),
        "last_click_end": iso(last_time),
        "test_from": iso(split_time),
    }
    return train, test, info


def count_prefix_samples(sessions, min_prefix: int) -> int:
    return sum(max(0, len(s) - min_prefix) for s in sessions)


def write_dataset(out_dir, train, test, protocol: Protocol, source: dict, info: dict) -> dict:
    """Writes train.txt, test.txt, stats.json; each through a temporary name then os.replace."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {
        "protocol": protocol.name,
        "min_prefix": protocol.min_prefix,
        "n_items": info["n_items"],
        "train": {"sessions": len(train), "clicks": sum(map(len, train)),
                  "samples": count_prefix_samples(train, protocol.min_prefix),
                  "longest_session": max(map(len, train))},
        "test": {"sessions": len(test), "clicks": sum(map(len, test)),
                 "samples": count_prefix_samples(test, protocol.min_prefix),
                 "longest_session": max(map(len, test))},
        "date_range": {k: info[k] for k in ("first_click_end", "last_click_end", "test_from")},
        "source": source,
    }
    texts = {
        "train.txt": "".join(" ".join(map(str, s)) + "\n" for s in train),
        "test.txt": "".join(" ".join(map(str, s)) + "\n" for s in test),
        "stats.json": json.dumps(stats, indent=2) + "\n",
    }
    temporaries = []
    for name, text in texts.items():
        tmp = out_dir / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        temporaries.append((tmp, out_dir / name))
    for tmp, final in temporaries:
        os.replace(tmp, final)
    return stats


# ---------------------------------------------------------------- raw readers


def _check_header(path, header, expected, sep_name):
    if header is None:
        raise DataError(f"{path}:1: empty file, expected the header {sep_name.join(expected)!r}")
    if [h.strip() for h in header] != expected:
        raise DataError(f"{path}:1: wrong columns {header!r}, expected {expected!r}")


def _raw_rows(path, expected, delimiter, fields_name):
    """(line number, row) of a delimited file with the header `expected`; blank lines
    skipped, rows with the wrong number of fields stop with the file and line."""
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        _check_header(path, next(reader, None), expected, delimiter)
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(expected):
                raise DataError(f"{path}:{line}: expected {len(expected)} {fields_name} fields, "
                                f"got {len(row)}: {row!r}")
            yield line, row


def read_diginetica(path, unsorted: bool = False) -> list[RawSession]:
    """CIKM Cup 2016 train-item-views.csv: session_id;user_id;item_id;timeframe;eventdate.

    Clicks are ordered by (eventdate, timeframe) unless `unsorted` (file order, the order
    the paper's camera-ready numbers used). A session's time is its last eventdate.
    """
    expected = ["session_id", "user_id", "item_id", "timeframe", "eventdate"]
    clicks: dict = {}
    for line, row in _raw_rows(path, expected, ";", "';'-separated"):
        try:
            session, item, timeframe = int(row[0]), int(row[2]), int(row[3])
            day = dt.datetime.strptime(row[4], "%Y-%m-%d").replace(tzinfo=dt.timezone.utc).timestamp()
        except ValueError as e:
            raise DataError(f"{path}:{line}: malformed row {row!r} ({e})") from None
        clicks.setdefault(session, []).append((day, timeframe, len(clicks.get(session, ())), item))
    sessions = []
    for session, rows in clicks.items():
        if not unsorted:
            rows.sort()  # (eventdate, timeframe, file position)
        sessions.append(RawSession(f"{session:012d}", max(r[0] for r in rows), [r[3] for r in rows]))
    if not sessions:
        raise DataError(f"{path}: no click rows after the header")
    return sessions


def read_retailrocket(path) -> list[RawSession]:
    """Kaggle events.csv (timestamp ms, visitorid, event, itemid, transactionid): views only,
    sorted by (visitor, time), a new session after a gap of more than 30 minutes.

    Also accepts the already sessionized TSV sample (timestamp s, user_id, item_id, session_id).
    """
    with open(path, newline="") as f:
        first = f.readline()
    if "\t" in first:
        return _read_retailrocket_sessions_tsv(path)
    expected = ["timestamp", "visitorid", "event", "itemid", "transactionid"]
    views = []
    for line, row in _raw_rows(path, expected, ",", "','-separated"):
        if row[2] not in ("view", "addtocart", "transaction"):
            raise DataError(f"{path}:{line}: unknown event {row[2]!r}")
        if row[2] != "view":
            continue
        try:
            views.append((int(row[1]), int(row[0]) / 1000.0, int(row[3])))
        except ValueError as e:
            raise DataError(f"{path}:{line}: malformed row {row!r} ({e})") from None
    if not views:
        raise DataError(f"{path}: no view events")
    views.sort(key=lambda v: (v[0], v[1]))
    sessions: list[RawSession] = []
    previous_visitor, previous_time = None, None
    for visitor, time, item in views:
        if visitor != previous_visitor or time - previous_time > SESSION_GAP_SECONDS:
            sessions.append(RawSession(f"{visitor:012d}-{time:014.3f}", time, []))
        sessions[-1].items.append(item)
        sessions[-1].end_time = time
        previous_visitor, previous_time = visitor, time
    return sessions


def _read_retailrocket_sessions_tsv(path) -> list[RawSession]:
    expected = ["timestamp", "user_id", "item_id", "session_id"]
    clicks: dict = {}
    for line, row in _raw_rows(path, expected, "\t", "tab-separated"):
        try:
            time, item, session = float(row[0]), int(row[2]), int(row[3])
        except ValueError as e:
            raise DataError(f"{path}:{line}: malformed row {row!r} ({e})") from None
        clicks.setdefault(session, []).append((time, item))
    if not clicks:
        raise DataError(f"{path}: no click rows after the header")
    sessions = []
    for session, rows in clicks.items():
        rows.sort(key=lambda r: r[0])  # stable: ties keep file order
        sessions.append(RawSession(f"{session:012d}", rows[-1][0], [r[1] for r in rows]))
    return sessions


def generate_synthetic(n_items: int = 400, n_sessions: int = 6000, n_clusters: int = 20,
                       days: int = 60, seed: int = 1) -> list[RawSession]:
    """Sessions with learnable structure: each item has two preferred successors in its
    cluster (a sparse Markov chain), plus random in-cluster jumps and rare noise clicks."""
    rng = random.Random(seed)
    cluster_of = [i % n_clusters for i in range(n_items)]
    members = [[i for i in range(n_items) if cluster_of[i] == c] for c in range(n_clusters)]
    successors = [rng.sample(members[cluster_of[i]], 2) for i in range(n_items)]
    popularity = [1.0 / (1 + rank) ** 0.7 for rank in range(n_items)]  # Zipf-like starts
    sessions = []
    start = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc).timestamp()
    for k in range(n_sessions):
        length = min(30, 3 + int(rng.expovariate(1 / 4)))
        item = rng.choices(range(n_items), weights=popularity)[0]
        items = [item]
        for _ in range(length - 1):
            u = rng.random()
            if u < 0.75:
                item = successors[item][0 if rng.random() < 0.7 else 1]
            elif u < 0.95:
                item = rng.choice(members[cluster_of[item]])
            else:
                item = rng.randrange(n_items)
            items.append(item)
        end_time = start + days * SECONDS_PER_DAY * (k + 1) / n_sessions
        sessions.append(RawSession(f"{k:08d}", end_time, [i + 1 for i in items]))
    return sessions


def prepare(dataset: str, out_dir, raw=None, protocol: str = DEFAULT_PROTOCOL,
            unsorted: bool = False, seed: int = 1, synthetic_sessions: int = 6000,
            synthetic_items: int = 400) -> dict:
    """Raw data -> session text in out_dir; returns the stats written to stats.json."""
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    chosen = PROTOCOLS[protocol]
    if dataset == "synthetic":
        sessions = generate_synthetic(n_items=synthetic_items, n_sessions=synthetic_sessions, seed=seed)
        source = {"dataset": "synthetic", "seed": seed, "sessions": synthetic_sessions, "items": synthetic_items}
    else:
        if raw is None:
            raise DataError(f"prepare {dataset}: --raw FILE is required")
        if not Path(raw).is_file():
            raise DataError(f"{raw}: no such file")
        if dataset == "diginetica":
            sessions = read_diginetica(raw, unsorted=unsorted)
            source = {"dataset": "diginetica", "raw": str(raw),
                      "click_order": "file order (--unsorted)" if unsorted else "eventdate, timeframe"}
        elif dataset == "retailrocket":
            sessions = read_retailrocket(raw)
            source = {"dataset": "retailrocket", "raw": str(raw), "session_gap_s": SESSION_GAP_SECONDS}
        else:
            raise DataError(f"unknown dataset {dataset!r}; choose diginetica, retailrocket or synthetic")
    train, test, info = apply_protocol(sessions, chosen, str(raw or "synthetic"))
    return write_dataset(out_dir, train, test, chosen, source, info)


# ---------------------------------------------------------------- loading


def read_session_file(path) -> list[list[int]]:
    """Session text -> list of id lists; a malformed line stops with file:line."""
    sessions = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                raise DataError(f"{path}:{line_number}: empty line (expected item ids separated by spaces)")
            try:
                items = [int(x) for x in fields]
            except ValueError:
                raise DataError(f"{path}:{line_number}: not an integer item id in {line.strip()[:80]!r}") from None
            if min(items) < 1:
                raise DataError(f"{path}:{line_number}: item ids must be >= 1, got {min(items)}")
            sessions.append(items)
    if not sessions:
        raise DataError(f"{path}: no sessions")
    return sessions


@dataclass
class SessionData:
    """A data folder: training and test sessions, the catalogue size and the protocol."""

    directory: Path
    train_sessions: list
    test_sessions: list
    n_items: int
    protocol: Protocol

    @classmethod
    def load(cls, directory) -> "SessionData":
        directory = Path(directory)
        for name in ("train.txt", "test.txt"):
            if not (directory / name).is_file():
                raise DataError(f"{directory / name}: missing (a data folder holds train.txt and test.txt)")
        train = read_session_file(directory / "train.txt")
        test = read_session_file(directory / "test.txt")
        protocol = PROTOCOLS[DEFAULT_PROTOCOL]
        n_items = max(max(map(max, train)), max(map(max, test)))
        stats_path = directory / "stats.json"
        if stats_path.is_file():
            stats = json.loads(stats_path.read_text())
            name = stats.get("protocol", DEFAULT_PROTOCOL)
            if name not in PROTOCOLS:
                raise DataError(f"{stats_path}: unknown protocol {name!r}; expected one of {sorted(PROTOCOLS)}")
            protocol = PROTOCOLS[name]
            n_items = max(n_items, int(stats.get("n_items", n_items)))
        return cls(directory, train, test, n_items, protocol)

    @property
    def longest_session(self) -> int:
        return max(max(map(len, self.train_sessions)), max(map(len, self.test_sessions)))

    def split_validation(self, fraction: float):
        """(train, valid): the latest `fraction` of training sessions (by line order) validate."""
        n_valid = int(round(len(self.train_sessions) * fraction))
        if n_valid == 0:
            return self.train_sessions, []
        return self.train_sessions[:-n_valid], self.train_sessions[-n_valid:]


class PrefixSamples:
    """Prefix expansion on the fly: session s of length n gives (s[:k], s[k]) for
    k = min_prefix .. n-1. Stored as a flat id array plus (session start, prefix length)."""

    def __init__(self, sessions, min_prefix: int):
        lengths = np.fromiter((len(s) for s in sessions), dtype=np.int64, count=len(sessions))
        self.items = np.fromiter((i for s in sessions for i in s), dtype=np.int64, count=int(lengths.sum()))
        starts = np.cumsum(lengths) - lengths
        per_session = np.maximum(lengths - min_prefix, 0)
        self.sample_start = np.repeat(starts, per_session)
        offsets = np.cumsum(per_session) - per_session
        within = np.arange(int(per_session.sum()), dtype=np.int64) - np.repeat(offsets, per_session)
        self.prefix_length = within + min_prefix

    def __len__(self) -> int:
        return len(self.prefix_length)

    def batch(self, indices):
        """(items (B, L) right-padded with 0 to this batch's longest prefix, lengths (B,), targets (B,))."""
        indices = np.asarray(indices, dtype=np.int64)
        start, length = self.sample_start[indices], self.prefix_length[indices]
        width = int(length.max())
        position = np.arange(width, dtype=np.int64)
        real = position[None, :] < length[:, None]
        gathered = self.items[np.where(real, start[:, None] + position[None, :], 0)]
        items = np.where(real, gathered, 0)
        targets = self.items[start + length]
        return torch.from_numpy(items), torch.from_numpy(length), torch.from_numpy(targets)

    def item_counts(self, n_items: int) -> np.ndarray:
        return np.bincount(self.items, minlength=n_items + 1)


def batch_index_lists(n_samples: int, batch_size: int, shuffle: bool, seed: int = 0,
                      lengths=None, bucket_pool: int = 0) -> list:
    """Sample indices cut into batches; shuffled with a generator seeded by `seed`.

    With `lengths` and bucket_pool > 0 the shuffled order is cut into pools of
    bucket_pool batches, each pool sorted by prefix length, and the batches shuffled:
    batches hold similar lengths, so padding to the batch's longest costs little."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_samples, generator=generator).numpy() if shuffle else np.arange(n_samples)
    if shuffle and lengths is not None and bucket_pool > 0:
        pool = batch_size * bucket_pool
        order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")]
                                for chunk in np.split(order, range(pool, n_samples, pool))])
        batches = [order[i:i + batch_size] for i in range(0, n_samples, batch_size)]
        permutation = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in permutation]
    return [order[i:i + batch_size] for i in range(0, n_samples, batch_size)]


def n_batches(n_samples: int, batch_size: int) -> int:
    return math.ceil(n_samples / batch_size)
