"""SR-GNN-format data folders (the field's published benchmark files) -> session text.

SR-GNN, GCE-GNN and most later repositories publish each data set as pickles:
train.txt and test.txt hold (prefixes, targets), every session s of n clicks expanded into
the n - 1 samples (s[:-1], s[-1]), (s[:-2], s[-2]), ..., (s[:1], s[1]) in that order (SR-GNN's
preprocess.py, process_seqs); all_train_seq.txt holds the training sessions themselves.
`prepare_srgnn` reads them with an unpickler that builds only builtin containers and numbers
(a pickle naming any global is refused before anything of it runs), rebuilds the sessions
from the samples, checks the rebuild by expanding it again, and writes train.txt, test.txt
and stats.json (protocol srgnn) as `dsan prepare` does for raw logs. No torch here.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

from .errors import DataError

class _BuiltinsOnly(pickle.Unpickler):
    """Builds lists, tuples, dicts, sets, strings and numbers; any global is refused."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        raise DataError(f"{self.path}: the pickle names the global {module}.{name}; only builtin containers "
                        "and numbers are accepted (nothing of the file was run)")


def load_pickle(path: Path):
    """The object in a pickle of builtin containers; a clear error for anything else."""
    data = path.read_bytes()
    try:
        return _BuiltinsOnly(io.BytesIO(data), path).load()
    except DataError:
        raise
    except Exception as e:  # truncated, not a pickle, or a protocol feature outside the builtins
        raise DataError(f"{path}: not a readable pickle of lists ({type(e).__name__}: {str(e)[:120]})") from None


def _check_id(item, path: Path, what: str) -> None:
    if isinstance(item, bool) or not isinstance(item, int) or item < 1:
        raise DataError(f"{path}: {what} holds {item!r}; item ids are integers >= 1")


def _id_list(value, path: Path, what: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{path}: {what} must be a non-empty list of item ids, got {type(value).__name__} "
                        f"{str(value)[:60]}")
    for item in value:
        _check_id(item, path, what)
    return list(value)


def _pairs(obj, path: Path) -> tuple[list, list]:
    if not (isinstance(obj, (list, tuple)) and len(obj) == 2 and all(isinstance(o, (list, tuple)) for o in obj)):
        raise DataError(f"{path}: expected a pair (prefixes, targets) of two lists, as SR-GNN's train.txt/test.txt")
    prefixes, targets = obj
    if len(prefixes) != len(targets):
        raise DataError(f"{path}: {len(prefixes)} prefixes but {len(targets)} targets")
    prefixes = [_id_list(p, path, f"prefix {i}") for i, p in enumerate(prefixes)]
    for i, t in enumerate(targets):
        _check_id(t, path, f"target {i}")
    return prefixes, list(targets)


def expand(sessions: list[list[int]]) -> tuple[list, list]:
    """SR-GNN's samples of the sessions: (s[:-i], s[-i]) for i = 1 .. len(s) - 1, session by session."""
    prefixes, targets = [], []
    for s in sessions:
        for i in range(1, len(s)):
            prefixes.append(s[:-i])
            targets.append(s[-i])
    return prefixes, targets


def rebuild(prefixes: list, targets: list, path: Path) -> list[list[int]]:
    """The sessions whose expansion gives exactly these samples (an error names the first sample
    that does not fit)."""
    sessions, i = [], 0
    while i < len(prefixes):
        session = prefixes[i] + [targets[i]]
        for k in range(len(session) - 2, 0, -1):
            j = i + len(session) - 1 - k
            if j >= len(prefixes) or prefixes[j] != session[:k] or targets[j] != session[k]:
                raise DataError(f"{path}: sample {j} does not continue the session begun at sample {i} (SR-GNN's "
                                f"order: a session's prefixes from the longest down to one click)")
        sessions.append(session)
        i += len(session) - 1
    if expand(sessions) != (prefixes, targets):  # the rebuild, expanded again, is the file
        raise DataError(f"{path}: the sessions rebuilt from the samples do not expand back to them")
    return sessions


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_srgnn(raw_dir) -> tuple[list, list, dict]:
    """(train sessions, test sessions, source) of an SR-GNN-format folder: test.txt, and
    train.txt or (when train.txt is absent or holds no sample) all_train_seq.txt."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: no such folder (an SR-GNN-format folder holds train.txt and test.txt)")
    test_path = raw_dir / "test.txt"
    if not test_path.is_file():
        raise DataError(f"{test_path}: missing (an SR-GNN-format folder holds test.txt)")
    test = rebuild(*_pairs(load_pickle(test_path), test_path), test_path)
    used = {"test.txt": _sha256(test_path)}
    train_path = raw_dir / "train.txt"
    train = None
    if train_path.is_file():
        prefixes, targets = _pairs(load_pickle(train_path), train_path)
        if prefixes:
            train = rebuild(prefixes, targets, train_path)
            used["train.txt"] = _sha256(train_path)
    if train is None:
        seq_path = raw_dir / "all_train_seq.txt"
        if not seq_path.is_file():
            raise DataError(f"{raw_dir}: no training samples (train.txt absent or empty) and no all_train_seq.txt")
        sequences = load_pickle(seq_path)
        if not isinstance(sequences, (list, tuple)) or not sequences:
            raise DataError(f"{seq_path}: expected a non-empty list of sessions")
        train = [_id_list(s, seq_path, f"session {i}") for i, s in enumerate(sequences)]
        short = sum(len(s) < 2 for s in train)
        train = [s for s in train if len(s) >= 2]  # a one-click session gives no sample
        if not train:
            raise DataError(f"{seq_path}: no session of two or more clicks")
        used["all_train_seq.txt"] = _sha256(seq_path)
        source = {"dataset": "srgnn", "raw": str(raw_dir), "sha256": used, "one_click_sessions_dropped": short}
        return train, test, source
    return train, test, {"dataset": "srgnn", "raw": str(raw_dir), "sha256": used}
