import json

import numpy as np
import pytest

from testing import RAW_DIGINETICA, RAW_RETAILROCKET_SESSIONS, RETAILROCKET, make_tiny_synthetic, require
from dsan.data import (DataError, PrefixSamples, SessionData, batch_index_lists, prepare, read_diginetica,
                       read_retailrocket, read_session_file)


def write(path, text):
    path.write_text(text)
    return path


# ---------------------------------------------------------------- loading real data


def test_retailrocket_loader_yields_the_original_sample_counts():
    data = SessionData.load(require(RETAILROCKET))
    assert data.n_items == 36968
    assert data.protocol.min_prefix == 2  # no stats.json: DSAN protocol
    assert len(PrefixSamples(data.train_sessions, 2)) == 433_648
    assert len(PrefixSamples(data.test_sessions, 2)) == 15_132


def test_validation_is_the_latest_tenth_of_training_sessions():
    data = SessionData.load(require(RETAILROCKET))
    train, valid = data.split_validation(0.1)
    assert len(valid) == round(len(data.train_sessions) * 0.1)
    assert valid == data.train_sessions[-len(valid):]
    assert len(train) + len(valid) == len(data.train_sessions)


# ---------------------------------------------------------------- prefix samples and batches


def test_prefix_expansion_dsan_and_srgnn():
    sessions = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    dsan = PrefixSamples(sessions, min_prefix=2)
    pairs = [(items[:n].tolist(), t) for items, n, t in zip(*[x.numpy() for x in dsan.batch(range(len(dsan)))])]
    assert pairs == [([1, 2], 3), ([1, 2, 3], 4), ([7, 8], 9)]
    srgnn = PrefixSamples(sessions, min_prefix=1)
    assert len(srgnn) == 3 + 1 + 2


def test_batch_is_padded_to_its_own_longest_prefix():
    samples = PrefixSamples([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11]], min_prefix=2)
    short = [i for i in range(len(samples)) if samples.prefix_length[i] == 2]
    items, lengths, targets = samples.batch(short)
    assert items.shape == (2, 2)
    items, lengths, _ = samples.batch(range(len(samples)))
    assert items.shape[1] == 7 == int(lengths.max())
    assert (items[lengths < 7, -1] == 0).all()


def test_length_bucketed_batches_cover_every_sample_once_and_reduce_padding():
    rng = np.random.default_rng(0)
    sessions = [list(range(1, int(n) + 1)) for n in rng.integers(3, 60, size=400)]
    samples = PrefixSamples(sessions, 2)
    plain = batch_index_lists(len(samples), 32, True, seed=3)
    bucketed = batch_index_lists(len(samples), 32, True, seed=3, lengths=samples.prefix_length, bucket_pool=8)
    assert sorted(np.concatenate(bucketed).tolist()) == list(range(len(samples)))
    padded_cells = lambda batches: sum(len(b) * samples.prefix_length[b].max() for b in batches)  # noqa: E731
    assert padded_cells(bucketed) < 0.7 * padded_cells(plain)
    again = batch_index_lists(len(samples), 32, True, seed=3, lengths=samples.prefix_length, bucket_pool=8)
    assert all((a == b).all() for a, b in zip(bucketed, again))


def test_session_file_errors_name_file_and_line(tmp_path):
    bad = write(tmp_path / "train.txt", "1 2 3\n4 x 5\n")
    with pytest.raises(DataError, match=r"train.txt:2: item id 'x' is not a positive integer in ASCII digits"):
        read_session_file(bad)
    with pytest.raises(DataError, match=r"train.txt:2: empty line"):
        read_session_file(write(tmp_path / "train.txt", "1 2 3\n\n4 5\n"))
    with pytest.raises(DataError, match=r"train.txt:1: item ids must be >= 1"):
        read_session_file(write(tmp_path / "train.txt", "0 2 3\n"))


def test_missing_data_file_is_named(tmp_path):
    write(tmp_path / "train.txt", "1 2 3\n")
    with pytest.raises(DataError, match="test.txt: missing"):
        SessionData.load(tmp_path)


# ---------------------------------------------------------------- prepare


def test_prepare_diginetica_writes_contiguous_ids_and_stats(tmp_path):
    stats = prepare("diginetica", tmp_path, raw=require(RAW_DIGINETICA))
    train = read_session_file(tmp_path / "train.txt")
    test = read_session_file(tmp_path / "test.txt")
    ids = {i for s in train for i in s}
    assert ids == set(range(1, stats["n_items"] + 1))
    assert {i for s in test for i in s} <= ids
    assert min(map(len, train)) >= 3 and min(map(len, test)) >= 3
    on_disk = json.loads((tmp_path / "stats.json").read_text())
    assert on_disk == stats and on_disk["protocol"] == "dsan"
    assert on_disk["train"]["samples"] == len(PrefixSamples(train, 2))
    assert on_disk["source"]["click_order"] == "eventdate, timeframe"
    assert not list(tmp_path.glob(".*tmp*"))


def test_diginetica_click_order_follows_timeframe_unless_unsorted(tmp_path):
    raw = write(tmp_path / "views.csv", "session_id;user_id;item_id;timeframe;eventdate\n"
                                         "1;NA;30;300;2016-01-01\n1;NA;10;100;2016-01-01\n1;NA;20;200;2016-01-01\n")
    assert read_diginetica(raw)[0].items == [10, 20, 30]
    assert read_diginetica(raw, unsorted=True)[0].items == [30, 10, 20]


def test_prepare_srgnn_protocol_keeps_shorter_sessions(tmp_path):
    dsan = prepare("diginetica", tmp_path / "dsan", raw=require(RAW_DIGINETICA), protocol="dsan")
    srgnn = prepare("diginetica", tmp_path / "srgnn", raw=RAW_DIGINETICA, protocol="srgnn")
    assert srgnn["train"]["sessions"] > dsan["train"]["sessions"]
    data = SessionData.load(tmp_path / "srgnn")
    assert data.protocol.min_prefix == 1
    assert len(PrefixSamples(data.train_sessions, 1)) == srgnn["train"]["samples"]


def test_prepare_retailrocket_events_csv_sessionizes_on_30_minute_gaps(tmp_path):
    rows = ["timestamp,visitorid,event,itemid,transactionid"]
    minute = 60_000
    day0 = 1_433_000_000_000
    # visitor 1: three views, a 31-minute gap, three views; an addtocart that must be ignored
    for day in range(10):  # repeat over days so items pass the >= 5 filter and a test week exists
        t = day0 + day * 86_400_000
        rows += [f"{t},1,view,100,", f"{t + minute},1,view,101,", f"{t + 2 * minute},1,addtocart,999,",
                 f"{t + 3 * minute},1,view,102,", f"{t + 34 * minute},1,view,103,",
                 f"{t + 35 * minute},1,view,104,", f"{t + 36 * minute},1,view,100,"]
    raw = write(tmp_path / "events.csv", "\n".join(rows) + "\n")
    sessions = read_retailrocket(raw)
    assert [s.items for s in sessions[:2]] == [[100, 101, 102], [103, 104, 100]]
    stats = prepare("retailrocket", tmp_path / "out", raw=raw)
    assert stats["train"]["sessions"] + stats["test"]["sessions"] == 20
    assert 999 not in {i for s in read_session_file(tmp_path / "out" / "train.txt") for i in s}


def test_prepare_accepts_the_sessionized_retailrocket_sample(tmp_path):
    stats = prepare("retailrocket", tmp_path, raw=require(RAW_RETAILROCKET_SESSIONS))
    assert stats["train"]["samples"] > 0 and stats["test"]["samples"] > 0


def test_malformed_raw_rows_stop_with_file_and_line_and_write_nothing(tmp_path):
    raw = write(tmp_path / "views.csv", "session_id;user_id;item_id;timeframe;eventdate\n"
                                         "1;NA;10;100;2016-01-01\n1;NA;ten;100;2016-01-01\n")
    with pytest.raises(DataError, match=r"views.csv:3: malformed row"):
        prepare("diginetica", tmp_path / "out", raw=raw)
    assert not (tmp_path / "out").exists()
    wrong = write(tmp_path / "wrong.csv", "a;b;c\n1;2;3\n")
    with pytest.raises(DataError, match=r"wrong.csv:1: wrong columns"):
        prepare("diginetica", tmp_path / "out", raw=wrong)
    events = write(tmp_path / "events.csv", "timestamp,visitorid,event,itemid,transactionid\n1,2,view\n")
    with pytest.raises(DataError, match=r"events.csv:2: expected 5"):
        prepare("retailrocket", tmp_path / "out", raw=events)


def test_empty_result_after_filters_is_an_error(tmp_path):
    raw = write(tmp_path / "views.csv", "session_id;user_id;item_id;timeframe;eventdate\n"
                                         "1;NA;10;100;2016-01-01\n1;NA;11;200;2016-01-01\n")
    with pytest.raises(DataError, match="views.csv: no session left"):
        prepare("diginetica", tmp_path / "out", raw=raw)


def test_synthetic_data_is_seeded(tmp_path):
    make_tiny_synthetic(tmp_path / "a", seed=1)
    make_tiny_synthetic(tmp_path / "b", seed=1)
    make_tiny_synthetic(tmp_path / "c", seed=2)
    text = lambda d: (d / "train.txt").read_text()  # noqa: E731
    assert text(tmp_path / "a") == text(tmp_path / "b") != text(tmp_path / "c")


# ---------------------------------------------------------------- inputs that must not end in a traceback


@pytest.mark.parametrize("field", ["\u0661", "1_0", "+2", "-3", "\u00b2", "1.0"])
def test_ids_are_ascii_digits_only(tmp_path, field):
    path = write(tmp_path / "train.txt", f"1 2 3\n4 {field} 5\n")
    with pytest.raises(DataError, match=r"train.txt:2: item id .* is not a positive integer in ASCII digits"):
        read_session_file(path)


def test_non_utf8_bytes_name_the_file_line_and_byte(tmp_path):
    path = tmp_path / "test.txt"
    path.write_bytes(b"1 2 3\n4 5 \xff6\n")
    with pytest.raises(DataError, match=r"test.txt:2: not UTF-8 text \(byte 0xff at column 5\)"):
        read_session_file(path)
    raw = tmp_path / "views.csv"
    raw.write_bytes(b"session_id;user_id;item_id;timeframe;eventdate\n1;NA;1\xe90;100;2016-01-01\n")
    with pytest.raises(DataError, match=r"views.csv:2: not UTF-8 text"):
        read_diginetica(raw)


def test_a_utf8_byte_order_mark_and_other_line_ends_are_accepted(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes("\ufeff1 2 3\n4 5\n".encode())
    assert read_session_file(path) == [[1, 2, 3], [4, 5]]
    for text in ("1 2 3\n4 5", "1 2 3\r\n4\t5\r\n"):  # no final newline; Windows line ends and tabs
        assert read_session_file(write(tmp_path / "t.txt", text)) == [[1, 2, 3], [4, 5]]
    raw = tmp_path / "views.csv"
    raw.write_bytes("\ufeffsession_id;user_id;item_id;timeframe;eventdate\n1;NA;10;100;2016-01-01\n".encode())
    assert read_diginetica(raw)[0].items == [10]


@pytest.mark.parametrize("space", ["\u00a0", "\u2003", "\u3000"])
def test_a_non_ascii_space_between_ids_is_named_with_its_column(tmp_path, space):
    path = write(tmp_path / "train.txt", f"1 2 3\n4{space}5 6\n")
    with pytest.raises(DataError, match=rf"train.txt:2: character U\+{ord(space):04X} at column 2 is not an ASCII "
                                        "space or tab"):
        read_session_file(path)
    with pytest.raises(DataError, match=rf"train.txt:2: character U\+{ord(space):04X} at column 1"):
        read_session_file(write(tmp_path / "train.txt", f"1 2 3\n{space}\n"))


def test_old_mac_line_ends_are_refused(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(b"1 2 3\r4 5 6\r")
    with pytest.raises(DataError, match=r"train.txt:1: carriage return without a line feed \(old Mac line ends "
                                        r"are not supported"):
        read_session_file(path)
    path.write_bytes(b"1 2 3\r\n4 5 6\r\n7 8\r9\r\n")
    with pytest.raises(DataError, match=r"train.txt:3: carriage return without a line feed"):
        read_session_file(path)
    raw = tmp_path / "views.csv"
    raw.write_bytes(b"session_id;user_id;item_id;timeframe;eventdate\r1;NA;10;100;2016-01-01\r")
    with pytest.raises(DataError, match=r"views.csv:1: carriage return without a line feed"):
        read_diginetica(raw)


def test_a_raw_field_beyond_the_csv_size_limit_is_named(tmp_path):
    raw = write(tmp_path / "views.csv", "session_id;user_id;item_id;timeframe;eventdate\n"
                                         "1;NA;10;100;2016-01-01\n1;NA;" + "1" * 200_000 + ";100;2016-01-01\n")
    with pytest.raises(DataError, match=r"views.csv:3: not readable as ';'-separated fields \(field larger"):
        read_diginetica(raw)


def test_unicode_digits_in_raw_files_are_refused_with_file_and_line(tmp_path):
    raw = write(tmp_path / "views.csv", "session_id;user_id;item_id;timeframe;eventdate\n1;NA;\u0661\u0662;100;2016-01-01\n")
    with pytest.raises(DataError, match=r"views.csv:2: malformed row .*ASCII digits"):
        read_diginetica(raw)


def test_an_id_beyond_int64_is_refused(tmp_path):
    path = write(tmp_path / "train.txt", "1 2 3\n4 100000000000000000000 5\n")
    with pytest.raises(DataError, match=r"train.txt:2: item id 100000000000000000000 is beyond the 64-bit"):
        read_session_file(path)
    # more digits than int() converts (4300): the same message, the id cut short
    path = write(tmp_path / "train.txt", "1 2 3\n4 1" + "0" * 4300 + " 5\n")
    with pytest.raises(DataError, match=r"train.txt:2: item id 1000000000\S*\.\.\. \(4301 characters\) is beyond "
                                        "the 64-bit"):
        read_session_file(path)
    # leading zeros do not make an id large
    path = write(tmp_path / "train.txt", "1 2 3\n4 " + "0" * 5000 + "7 5\n")
    assert read_session_file(path) == [[1, 2, 3], [4, 7, 5]]


def test_a_malformed_raw_row_is_quoted_short(tmp_path):
    raw = write(tmp_path / "views.csv", "session_id;user_id;item_id;timeframe;eventdate\n"
                                         "1;NA;1" + "0" * 5000 + ";100;2016-01-01\n")
    with pytest.raises(DataError, match=r"views.csv:2: malformed row") as error:
        read_diginetica(raw)
    assert len(str(error.value)) < 300, str(error.value)


def data_folder(tmp_path, train, test, stats=None):
    tmp_path.mkdir(exist_ok=True)
    write(tmp_path / "train.txt", train)
    write(tmp_path / "test.txt", test)
    if stats is not None:
        write(tmp_path / "stats.json", stats)
    return tmp_path


def test_non_contiguous_ids_are_renumbered_and_reported(tmp_path):
    # a huge id (10^12) needs no 10^12-row table: the catalogue is the ids seen in training
    data = SessionData.load(data_folder(tmp_path, "7 1000000000000 7\n30 7 30\n", "30 1000000000000 7\n"))
    assert data.n_items == 3
    assert data.train_sessions == [[1, 3, 1], [2, 1, 2]] and data.test_sessions == [[2, 3, 1]]
    assert [data.original_id(i) for i in (1, 2, 3)] == [7, 30, 1000000000000]
    assert any("item ids are not 1..N (3 distinct ids, largest 1000000000000): renumbered 1..3" in n for n in data.notes)
    assert data.catalogue.startswith("sha256:")
    contiguous = SessionData.load(data_folder(tmp_path / "c", "1 2 3\n", "3 2 1\n"))
    assert contiguous.original_ids is None and contiguous.catalogue == "1..3"


def test_test_clicks_on_items_never_trained_are_dropped_with_a_count(tmp_path):
    data = SessionData.load(data_folder(tmp_path, "1 2 3\n3 2 1\n", "1 9 2 3\n8 9\n"))
    assert data.n_items == 3 and data.test_sessions == [[1, 2, 3], []]
    assert any("test.txt: 3 clicks on 2 items never seen in training dropped" in n for n in data.notes)


def test_without_stats_json_the_assumed_protocol_is_said_and_can_be_chosen(tmp_path):
    folder = data_folder(tmp_path, "1 2 3\n3 2 1\n", "1 2\n")
    data = SessionData.load(folder)
    assert data.protocol.name == "dsan" and any("no stats.json, assuming the dsan protocol" in n for n in data.notes)
    with pytest.raises(DataError, match="the test set .* yields no samples: none of its 1 sessions has more than 2"):
        data.samples(data.test_sessions, 300, "test set (test.txt)")
    srgnn = SessionData.load(folder, "srgnn")
    assert srgnn.protocol.min_prefix == 1 and not srgnn.notes
    assert len(srgnn.samples(srgnn.test_sessions, 300, "test set")) == 1


def test_stats_json_decides_the_protocol_and_must_be_well_formed(tmp_path):
    folder = data_folder(tmp_path, "1 2 3\n3 2 1\n", "1 2 3\n", '{"protocol": "srgnn", "n_items": 3}')
    assert SessionData.load(folder).protocol.name == "srgnn"
    with pytest.raises(DataError, match="stats.json: the data was prepared under the srgnn protocol; --protocol dsan"):
        SessionData.load(folder, "dsan")
    for text, message in [("{not json", r"stats.json:1: not valid JSON"),
                          ("[1, 2]", "stats.json: expected a JSON object"),
                          ('{"protocol": "x", "n_items": 3}', 'stats.json: "protocol" must be one of dsan, srgnn'),
                          ('{"protocol": "dsan", "n_items": "3"}', 'stats.json: "n_items" must be a positive integer'),
                          ('{"protocol": "dsan", "n_items": 4}', "stats.json: n_items is 4, but .*train.txt has 3")]:
        write(folder / "stats.json", text)
        with pytest.raises(DataError, match=message):
            SessionData.load(folder)


def test_stats_json_beyond_the_parser_limits_bom_and_bytes(tmp_path):
    folder = data_folder(tmp_path, "1 2 3\n3 2 1\n", "1 2 3\n")
    for text, message in [('{"protocol": "dsan", "n_items": 1' + "0" * 5000 + "}",
                           r"stats.json: unreadable JSON \(Exceeds the limit \(4300 digits\)"),
                          ("[" * 100_000 + "]" * 100_000, r"stats.json: unreadable JSON \(nested too deeply\)")]:
        write(folder / "stats.json", text)
        with pytest.raises(DataError, match=message):
            SessionData.load(folder)
    (folder / "stats.json").write_bytes(b'\xef\xbb\xbf{"protocol": "srgnn", "n_items": 3}\n')  # a BOM, as elsewhere
    assert SessionData.load(folder).protocol.name == "srgnn"
    (folder / "stats.json").write_bytes(b'{"protocol": "srgnn",\n "n_items": \xff3}\n')
    with pytest.raises(DataError, match=r"stats.json:2: not UTF-8 text \(byte 0xff at column 13\)"):
        SessionData.load(folder)
    (folder / "stats.json").unlink()
    (folder / "stats.json").mkdir()  # not silently taken for a missing file
    with pytest.raises(OSError, match="stats.json"):
        SessionData.load(folder)


def test_long_prefixes_keep_their_most_recent_clicks():
    samples = PrefixSamples([list(range(1, 11))], min_prefix=2, max_length=4)
    items, lengths, targets = samples.batch(range(len(samples)))
    assert lengths.tolist() == [2, 3, 4, 4, 4, 4, 4, 4] and samples.truncated == 5
    assert items[-1].tolist() == [6, 7, 8, 9] and targets.tolist() == list(range(3, 11))
    assert items[0].tolist() == [1, 2, 0, 0]
