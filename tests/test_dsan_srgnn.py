"""dsan prepare srgnn: SR-GNN-format pickles (train.txt / test.txt as (prefixes, targets),
all_train_seq.txt as sessions) -> session text, with a builtins-only unpickler."""

from __future__ import annotations

import json
import pickle
import random

import pytest

from dsan.cli import main
from dsan.data import SessionData, prepare
from dsan.errors import DataError
from dsan.srgnn import expand, rebuild


def sessions(n: int, seed: int, items: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(1, items) for _ in range(rng.randint(2, 9))] for _ in range(n)]


def write_srgnn(folder, train, test, all_train_seq=None, train_file=True):
    """The files as SR-GNN's preprocess.py writes them (pickle.dump of tuples of lists)."""
    folder.mkdir(parents=True, exist_ok=True)
    if train_file:
        pickle.dump(expand(train) if train is not None else ([], []), open(folder / "train.txt", "wb"))
    pickle.dump(expand(test), open(folder / "test.txt", "wb"))
    if all_train_seq is not None:
        pickle.dump(all_train_seq, open(folder / "all_train_seq.txt", "wb"))
    return folder


def test_the_sessions_and_sample_counts_come_back_from_the_expanded_pairs(tmp_path, capsys):
    train, test = sessions(300, 1), sessions(40, 2, items=25)
    raw = write_srgnn(tmp_path / "raw", train, test)
    assert main(["prepare", "srgnn", "--raw", str(raw), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    n_train, n_test = len(expand(train)[0]), len(expand(test)[0])
    assert f"train {len(train)} sessions / {n_train} samples, test {len(test)} sessions / {n_test} samples" in out
    assert [list(map(int, line.split())) for line in (tmp_path / "out" / "train.txt").read_text().splitlines()] == train
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["protocol"] == "srgnn" and stats["train"]["samples"] == n_train and stats["test"]["samples"] == n_test
    assert set(stats["source"]["sha256"]) == {"train.txt", "test.txt"} and "date_range" not in stats
    data = SessionData.load(tmp_path / "out")
    assert len(data.samples(data.train_sessions, 50, "training set")) == n_train


def test_all_train_seq_is_read_when_train_txt_is_absent_or_empty(tmp_path):
    train, test = sessions(50, 3), sessions(10, 4)
    for name, train_file in (("absent", False), ("empty", True)):
        raw = write_srgnn(tmp_path / name, None, test, all_train_seq=train + [[7]], train_file=train_file)
        stats = prepare("srgnn", tmp_path / f"out-{name}", raw=raw)
        assert stats["train"]["sessions"] == len(train) and stats["source"]["one_click_sessions_dropped"] == 1
        assert "all_train_seq.txt" in stats["source"]["sha256"]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # would create the marker file if it ever ran


def test_a_pickle_naming_a_global_is_refused_and_never_runs(tmp_path):
    raw = write_srgnn(tmp_path / "raw", sessions(5, 1), sessions(5, 2))
    marker = tmp_path / "ran"
    pickle.dump(([[1, 2]], [_Payload(marker)]), open(raw / "test.txt", "wb"))
    with pytest.raises(DataError, match="names the global .*open; only builtin containers"):
        prepare("srgnn", tmp_path / "out", raw=raw)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    (b"not a pickle", "not a readable pickle"),
    (pickle.dumps({"a": 1}), r"expected a pair \(prefixes, targets\)"),
    (pickle.dumps(([[1, 2]], [3, 4])), "1 prefixes but 2 targets"),
    (pickle.dumps(([[1, 0]], [3])), "item ids are integers >= 1"),
])
def test_files_that_are_not_srgnn_pairs_are_named(tmp_path, content, message):
    raw = write_srgnn(tmp_path / "raw", sessions(5, 1), sessions(5, 2))
    (raw / "test.txt").write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare("srgnn", tmp_path / "out", raw=raw)


def test_samples_out_of_srgnn_order_are_named():
    prefixes, targets = expand([[1, 2, 3, 4], [5, 6, 7]])
    prefixes[1], prefixes[2] = prefixes[2], prefixes[1]
    targets[1], targets[2] = targets[2], targets[1]
    with pytest.raises(DataError, match="sample 1 does not continue the session begun at sample 0"):
        rebuild(prefixes, targets, "test.txt")


def test_a_handwritten_stats_json_with_only_the_protocol_is_accepted(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.txt").write_text("1 2 3\n2 3\n")
    (folder / "test.txt").write_text("3 1\n")
    (folder / "stats.json").write_text('{"protocol": "srgnn"}')
    data = SessionData.load(folder)
    assert data.protocol.name == "srgnn" and data.n_items == 3
    assert any("no n_items; 3 items" in note for note in data.notes)


def test_the_srgnn_format_takes_no_other_protocol(tmp_path, capsys):
    raw = write_srgnn(tmp_path / "raw", sessions(5, 1), sessions(5, 2))
    assert main(["prepare", "srgnn", "--raw", str(raw), "--out", str(tmp_path / "o"), "--protocol", "dsan"]) == 2
    assert "expanded under the srgnn protocol already" in capsys.readouterr().err
