"""cluster.api's checks of a request, without a server: options, names, corpus paths."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cluster.api import Refused, check_name, corpus_path, count_prompts, parse_options
from neuroscan.config import SCAN_OPTIONS
from neuroscan.errors import UserError


def test_options_take_their_declared_types():
    got = parse_options({"high": "2.5", "max_per_layer": "7", "truncate": "true", "format": "arrow"})
    assert got == {"high": 2.5, "max_per_layer": 7, "truncate": True, "format": "arrow"}
    assert set(SCAN_OPTIONS) >= set(got)


@pytest.mark.parametrize(
    "query, line",
    [
        ({"stages": "2"}, "unknown option 'stages': use name or one of high, low"),
        ({"top_k": "1.5"}, "option top_k='1.5' is not a whole number"),
        ({"truncate": "maybe"}, "option truncate='maybe' is not true or false"),
    ],
)
def test_an_option_the_scan_cannot_choose_or_of_the_wrong_type_is_refused(query, line):
    with pytest.raises(Refused, match=line) as refused:
        parse_options(query)
    assert refused.value.status == 400


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../x", "x" * 65, "sp ace"])
def test_names_stay_one_plain_directory(name):
    with pytest.raises(Refused, match="is not allowed"):
        check_name(name)
    check_name("icl-a_2.v1")


def test_a_corpus_path_cannot_leave_its_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "secret.jsonl").write_text('{"text": "s"}\n')
    (root / "link.jsonl").symlink_to(tmp_path / "secret.jsonl")
    state = root / "scans" / ".neuroscan-service"  # --results under the corpus root
    (state / "corpora").mkdir(parents=True)
    (state / "corpora" / "other.jsonl").write_text('{"text": "another scan\'s"}\n')
    service = SimpleNamespace(cfg=SimpleNamespace(corpus_root=str(root)), state_dir=state.resolve())
    assert corpus_path(b'{"path": "sub/ok.jsonl"}', service) == root / "sub" / "ok.jsonl"
    with pytest.raises(Refused, match="in the service's state directory: name a corpus of your own"):
        corpus_path(b'{"path": "scans/.neuroscan-service/corpora/other.jsonl"}', service)
    for rel in ("../secret.jsonl", str(tmp_path / "secret.jsonl"), "link.jsonl", "sub/../../secret.jsonl"):
        with pytest.raises(Refused, match="outside the corpus root") as refused:
            corpus_path(json.dumps({"path": rel}).encode(), service)
        assert refused.value.status == 403
    with pytest.raises(Refused, match="no --corpus-root"):
        corpus_path(b'{"path": "sub/ok.jsonl"}', SimpleNamespace(cfg=SimpleNamespace(corpus_root=None)))
    with pytest.raises(Refused, match=r'must be \{"path"'):
        corpus_path(b'{"path": 3}', service)


def test_a_bad_row_names_its_line_not_the_servers_file(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n{"id": "q"}\n')
    with pytest.raises(UserError, match=r"^the corpus:2: prompt 'q' has no \"text\" field") as err:
        count_prompts(corpus)
    assert str(tmp_path) not in str(err.value)
