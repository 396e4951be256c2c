"""Session data: `prepare` (raw logs -> session text), loading, prefix samples, batches.

Session text: one session per line, item ids (ASCII digits; 1..N, contiguous) separated by
spaces, in click order; sessions in chronological order. A data folder holds train.txt,
test.txt and optionally stats.json (which records the protocol).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, DsanError
from .files import PARSER_LIMIT_ERRORS, parser_limit_reason, read_lines, write_atomically

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
SYNTHETIC_SESSIONS = 6000
SYNTHETIC_ITEMS = 400
SYNTHETIC_SEED = 1
INT64_MAX = 2**63 - 1
INT64_DIGITS = len(str(INT64_MAX))
QUOTE_LIMIT = 80  # characters of a bad field or row that an error message repeats


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
    """Writes train.txt, test.txt, stats.json: all three or none."""
    out_dir = Path(out_dir)
    created = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()]  # innermost first
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
        "source": source,
    }
    if "test_from" in info:  # raw logs: the time split
        stats["date_range"] = {k: info[k] for k in ("first_click_end", "last_click_end", "test_from")}
    try:
        write_atomically({
            out_dir / "train.txt": "".join(" ".join(map(str, s)) + "\n" for s in train),
            out_dir / "test.txt": "".join(" ".join(map(str, s)) + "\n" for s in test),
            out_dir / "stats.json": json.dumps(stats, indent=2) + "\n",
        })
    except DsanError:
        for folder in created:  # write_atomically left them empty: the failed command leaves nothing behind
            folder.rmdir()
        raise
    return stats


# ---------------------------------------------------------------- raw readers


def excerpt(text: str, limit: int = QUOTE_LIMIT) -> str:
    """text, or its first `limit` characters and its length: an error message stays one short line."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check_header(path, header, expected, sep_name):
    if header is None:
        raise DataError(f"{path}:1: empty file, expected the header {sep_name.join(expected)!r}")
    if [h.strip() for h in header] != expected:
        raise DataError(f"{path}:1: wrong columns {header!r}, expected {expected!r}")


def _raw_rows(path, expected, delimiter, fields_name):
    """(line number, row) of a delimited UTF-8 file with the header `expected`; blank lines
    skipped, rows with the wrong number of fields stop with the file and line."""
    reader = csv.reader((text for _, text in read_lines(path)), delimiter=delimiter)
    try:
        _check_header(path, next(reader, None), expected, delimiter)
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(expected):
                raise DataError(f"{path}:{line}: expected {len(expected)} {fields_name} fields, "
                                f"got {len(row)}: {excerpt(repr(row))}")
            yield line, row
    except csv.Error as e:  # e.g. a field beyond the csv module's size limit
        raise DataError(f"{path}:{reader.line_num}: not readable as {fields_name} fields ({e})") from None


def ascii_int(text: str) -> int:
    """A non-negative integer written in ASCII digits (no sign, '_', spaces or other scripts' digits)."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{excerpt(text)!r} is not a number in ASCII digits")
    digits = text.lstrip("0") or "0"
    if len(digits) > sys.get_int_max_str_digits():  # int() would refuse it
        raise ValueError(f"a number of {len(digits)} digits is too long")
    return int(digits)


def ascii_float(text: str) -> float:
    if not text.isascii():
        raise ValueError(f"{excerpt(text)!r} is not an ASCII number")
    return float(text)


def read_diginetica(path, unsorted: bool = False) -> list[RawSession]:
    """CIKM Cup 2016 train-item-views.csv: session_id;user_id;item_id;timeframe;eventdate.

    Clicks are ordered by (eventdate, timeframe) unless `unsorted` (file order, the order
    the paper's camera-ready numbers used). A session's time is its last eventdate.
    """
    expected = ["session_id", "user_id", "item_id", "timeframe", "eventdate"]
    clicks: dict = {}
    for line, row in _raw_rows(path, expected, ";", "';'-separated"):
        try:
            session, item, timeframe = ascii_int(row[0]), ascii_int(row[2]), ascii_int(row[3])
            day = dt.datetime.strptime(row[4], "%Y-%m-%d").replace(tzinfo=dt.timezone.utc).timestamp()
        except ValueError as e:
            raise DataError(f"{path}:{line}: malformed row {excerpt(repr(row))} ({e})") from None
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
    first = next(read_lines(path), (1, ""))[1]
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
            views.append((ascii_int(row[1]), ascii_int(row[0]) / 1000.0, ascii_int(row[3])))
        except ValueError as e:
            raise DataError(f"{path}:{line}: malformed row {excerpt(repr(row))} ({e})") from None
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
            time, item, session = ascii_float(row[0]), ascii_int(row[2]), ascii_int(row[3])
        except ValueError as e:
            raise DataError(f"{path}:{line}: malformed row {excerpt(repr(row))} ({e})") from None
        clicks.setdefault(session, []).append((time, item))
    if not clicks:
        raise DataError(f"{path}: no click rows after the header")
    sessions = []
    for session, rows in clicks.items():
        rows.sort(key=lambda r: r[0])  # stable: ties keep file order
        sessions.append(RawSession(f"{session:012d}", rows[-1][0], [r[1] for r in rows]))
    return sessions


def generate_synthetic(n_items: int = SYNTHETIC_ITEMS, n_sessions: int = SYNTHETIC_SESSIONS, n_clusters: int = 20,
                       days: int = 60, seed: int = SYNTHETIC_SEED) -> list[RawSession]:
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


def prepare(dataset: str, out_dir, raw=None, protocol: str | None = None,
            unsorted: bool = False, seed: int = SYNTHETIC_SEED, synthetic_sessions: int = SYNTHETIC_SESSIONS,
            synthetic_items: int = SYNTHETIC_ITEMS) -> dict:
    """Raw data -> session text in out_dir; returns the stats written to stats.json.
    protocol: default dsan for raw logs; SR-GNN-format folders are srgnn's by construction."""
    if dataset == "srgnn":
        return _prepare_srgnn(out_dir, raw, protocol)
    protocol = DEFAULT_PROTOCOL if protocol is None else protocol
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    chosen = PROTOCOLS[protocol]
    if dataset == "synthetic":
        sessions = generate_synthetic(n_items=synthetic_items, n_sessions=synthetic_sessions, seed=seed)
        source = {"dataset": "synthetic", "seed": seed, "sessions": synthetic_sessions, "items": synthetic_items}
    else:
        if raw is None:
            raise DataError(f"prepare {dataset}: --raw FILE is required (the raw log; see dsan prepare --help)")
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


def _prepare_srgnn(out_dir, raw, protocol) -> dict:
    from .srgnn import read_srgnn

    if protocol not in (None, "srgnn"):
        raise DataError(f"prepare srgnn: the SR-GNN files are expanded under the srgnn protocol already; "
                        f"--protocol {protocol} cannot apply")
    if raw is None:
        raise DataError("prepare srgnn: --raw DIR is required (the folder with train.txt/test.txt or all_train_seq.txt)")
    train, test, source = read_srgnn(raw)
    n_items = len({i for s in train for i in s})
    return write_dataset(out_dir, train, test, PROTOCOLS["srgnn"], source, {"n_items": n_items})


# ---------------------------------------------------------------- loading


SESSION_TEXT_BYTES = b"0123456789 \n"


def read_session_file(path) -> list[list[int]]:
    """Session text -> list of id lists; a malformed line stops with file:line."""
    sessions = []
    raw = Path(path).read_bytes()
    plain = not raw.translate(None, SESSION_TEXT_BYTES)  # only digits, spaces and newlines: no check per field
    for line_number, line in enumerate(raw.decode("ascii").split("\n"), 1) if plain else read_lines(path):
        fields = line.split()
        if not plain and not line.isascii():
            column, character = next((i, c) for i, c in enumerate(line, 1) if not c.isascii())
            if character.isspace():  # str.split() splits there too, so no field would look wrong
                raise DataError(f"{path}:{line_number}: character U+{ord(character):04X} at column {column} is not "
                                "an ASCII space or tab (ids are separated by spaces or tabs)")
        if not fields:
            if plain and line_number == raw.count(b"\n") + 1:
                break  # what follows the last newline
            raise DataError(f"{path}:{line_number}: empty line (expected item ids separated by spaces)")
        if not plain and not (line.isascii() and all(map(str.isdigit, fields))):
            bad = next(f for f in fields if not (f.isascii() and f.isdigit()))
            raise DataError(f"{path}:{line_number}: item id {bad[:40]!r} is not a positive integer in ASCII digits")
        if max(map(len, fields)) > INT64_DIGITS:  # also keeps int() under its 4300-digit limit
            fields = [f.lstrip("0") or "0" for f in fields]  # leading zeros do not make an id large
            large = next((f for f in fields if len(f) > INT64_DIGITS), None)
            if large is not None:
                raise DataError(f"{path}:{line_number}: item id {excerpt(large, 40)} is beyond the 64-bit integer "
                                "range")
        items = [int(x) for x in fields]
        largest = max(items)
        if largest > INT64_MAX:
            raise DataError(f"{path}:{line_number}: item id {largest} is beyond the 64-bit integer range")
        if min(items) < 1:
            raise DataError(f"{path}:{line_number}: item ids must be >= 1, got {min(items)}")
        sessions.append(items)
    if not sessions:
        raise DataError(f"{path}: no sessions")
    return sessions


def read_stats(path) -> dict:
    """stats.json as `prepare` writes it: a JSON object with a known `protocol` and a positive
    integer `n_items`, which may be left out (a stats.json written by hand: {"protocol": "srgnn"})."""
    try:
        stats = json.loads("".join(text for _, text in read_lines(path)))  # a BOM is dropped, bad bytes named
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    except PARSER_LIMIT_ERRORS as e:
        raise DataError(f"{path}: unreadable JSON ({parser_limit_reason(e)})") from None
    if not isinstance(stats, dict):
        raise DataError(f"{path}: expected a JSON object (as dsan prepare writes), got {type(stats).__name__}")
    if stats.get("protocol") not in PROTOCOLS:
        raise DataError(f"{path}: \"protocol\" must be one of {', '.join(PROTOCOLS)}, got {stats.get('protocol')!r}")
    n_items = stats.get("n_items")
    if "n_items" in stats and (not isinstance(n_items, int) or isinstance(n_items, bool) or n_items < 1):
        raise DataError(f"{path}: \"n_items\" must be a positive integer, got {n_items!r}")
    return stats


@dataclass
class SessionData:
    """A data folder: training and test sessions (item ids 1..n_items), the protocol, and the
    notes on what loading assumed or changed (to be shown to the user)."""

    directory: Path
    train_sessions: list
    test_sessions: list
    n_items: int
    protocol: Protocol
    notes: list
    original_ids: np.ndarray | None = None  # the file's id of item k is original_ids[k - 1]; None: the same
    dropped_test_clicks: int = 0  # test clicks on items never seen in training
    test_samples_before_drop: int = 0  # the test samples those clicks would have given with the rest

    @classmethod
    def load(cls, directory, protocol: str | None = None) -> "SessionData":
        """Reads train.txt and test.txt. The protocol comes from stats.json, else from `protocol`,
        else it is the DSAN one (noted). Item ids that are not 1..N are renumbered in increasing
        order, and test clicks on items never seen in training are dropped (both noted)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise DataError(f"{directory}: no such data folder (a data folder holds train.txt and test.txt)")
        for name in ("train.txt", "test.txt"):
            if not (directory / name).is_file():
                raise DataError(f"{directory / name}: missing (a data folder holds train.txt and test.txt)")
        train = read_session_file(directory / "train.txt")
        test = read_session_file(directory / "test.txt")
        notes = []
        stats_path = directory / "stats.json"
        stats = read_stats(stats_path) if stats_path.exists() else None  # a folder of that name is an error
        if stats is not None:
            if protocol is not None and protocol != stats["protocol"]:
                raise DataError(f"{stats_path}: the data was prepared under the {stats['protocol']} protocol; "
                                f"--protocol {protocol} contradicts it")
            chosen = PROTOCOLS[stats["protocol"]]
        elif protocol is not None:
            chosen = PROTOCOLS[protocol]
        else:
            chosen = PROTOCOLS[DEFAULT_PROTOCOL]
            notes.append(f"{directory}: no stats.json, assuming the dsan protocol (inputs of >= 2 clicks); "
                         "pass --protocol srgnn for data prepared under SR-GNN's (inputs of >= 1 click)")

        ids = np.unique(np.fromiter((i for s in train for i in s), dtype=np.int64))
        n_items = len(ids)
        if stats is not None and "n_items" not in stats:
            notes.append(f"{stats_path}: no n_items; {n_items} items, from the distinct ids of "
                         f"{directory / 'train.txt'}")
        elif stats is not None and stats["n_items"] != n_items:
            raise DataError(f"{stats_path}: n_items is {stats['n_items']}, but {directory / 'train.txt'} has "
                            f"{n_items} distinct item ids")
        original_ids = None
        if ids[-1] != n_items:  # sorted distinct ids >= 1 are 1..N exactly when the largest is N
            original_ids = ids
            notes.append(f"{directory / 'train.txt'}: item ids are not 1..N ({n_items} distinct ids, largest "
                         f"{ids[-1]}): renumbered 1..{n_items} in increasing order of id")
            train = [(np.searchsorted(ids, s) + 1).tolist() for s in train]
        kept_test, dropped_clicks, dropped_items = [], 0, set()
        for s in test:
            array = np.asarray(s, dtype=np.int64)
            position = np.minimum(np.searchsorted(ids, array), n_items - 1)
            seen = ids[position] == array
            if not seen.all():
                dropped_clicks += int((~seen).sum())
                dropped_items.update(array[~seen].tolist())
            kept_test.append((position[seen] + 1).tolist())
        if dropped_clicks:
            notes.append(f"{directory / 'test.txt'}: {dropped_clicks} clicks on {len(dropped_items)} items never "
                         "seen in training dropped (they cannot be ranked; the protocols drop them too)")
        return cls(directory, train, kept_test, n_items, chosen, notes, original_ids, dropped_clicks,
                   count_prefix_samples(test, chosen.min_prefix) if dropped_clicks else 0)

    @property
    def catalogue(self) -> str:
        """Which item ids the model's items 1..n_items stand for: '1..N', or a digest of the renumbered ids."""
        if self.original_ids is None:
            return f"1..{self.n_items}"
        return "sha256:" + hashlib.sha256(self.original_ids.astype("<i8").tobytes()).hexdigest()[:16]

    @property
    def longest_session(self) -> int:
        return max(max(map(len, self.train_sessions)), max(map(len, self.test_sessions), default=0))

    def original_id(self, item: int) -> int:
        """The id the data files use for item `item`."""
        return int(item) if self.original_ids is None else int(self.original_ids[item - 1])

    def split_validation(self, fraction: float):
        """(train, valid): the latest `fraction` of training sessions (by line order) validate."""
        n_valid = int(round(len(self.train_sessions) * fraction))
        if n_valid == 0:
            raise DataError(f"{self.directory / 'train.txt'}: the validation split (the latest {fraction:g} of its "
                            f"{len(self.train_sessions)} sessions) has no session: raise --valid-fraction, or train "
                            "with --selection none (no validation)")
        return self.train_sessions[:-n_valid], self.train_sessions[-n_valid:]

    def samples(self, sessions, max_length: int, what: str) -> "PrefixSamples":
        """The prefix samples of `sessions` under this data's protocol; none at all is an error."""
        samples = PrefixSamples(sessions, self.protocol.min_prefix, max_length)
        if len(samples) == 0:
            why = f"none of its {len(sessions)} sessions has more than"
            if sessions is self.test_sessions and self.test_samples_before_drop:
                why = (f"dropping its {self.dropped_test_clicks} clicks on items never seen in training left none of "
                       f"its {len(sessions)} sessions with more than")
            raise DataError(f"{self.directory}: the {what} yields no samples: {why} {self.protocol.min_prefix} clicks "
                            f"(the {self.protocol.name} protocol's shortest input)")
        return samples


class PrefixSamples:
    """Prefix expansion on the fly: session s of length n gives (s[:k], s[k]) for
    k = min_prefix .. n-1; a prefix longer than max_length keeps its last max_length clicks.
    Stored as a flat id array plus (target position, prefix length) per sample."""

    def __init__(self, sessions, min_prefix: int, max_length: int | None = None):
        lengths = np.fromiter((len(s) for s in sessions), dtype=np.int64, count=len(sessions))
        self.items = np.fromiter((i for s in sessions for i in s), dtype=np.int64, count=int(lengths.sum()))
        starts = np.cumsum(lengths) - lengths
        per_session = np.maximum(lengths - min_prefix, 0)
        offsets = np.cumsum(per_session) - per_session
        within = np.arange(int(per_session.sum()), dtype=np.int64) - np.repeat(offsets, per_session)
        full_length = within + min_prefix
        self.target_index = np.repeat(starts, per_session) + full_length
        self.prefix_length = full_length if max_length is None else np.minimum(full_length, max_length)
        self.truncated = int((self.prefix_length < full_length).sum())

    def __len__(self) -> int:
        return len(self.prefix_length)

    def batch(self, indices):
        """(items (B, L) right-padded with 0 to this batch's longest prefix, lengths (B,), targets (B,))."""
        indices = np.asarray(indices, dtype=np.int64)
        length = self.prefix_length[indices]
        start = self.target_index[indices] - length
        width = int(length.max())
        position = np.arange(width, dtype=np.int64)
        real = position[None, :] < length[:, None]
        gathered = self.items[np.where(real, start[:, None] + position[None, :], 0)]
        items = np.where(real, gathered, 0)
        targets = self.items[self.target_index[indices]]
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
