"""Progress: the right display for the stream, true totals, resumed counts, plain lines in logs."""

from __future__ import annotations

import io
import re

import pyarrow as pa

from cropi import runtime


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_display_follows_stream_and_verbosity(monkeypatch):
    monkeypatch.delenv("CROPI_QUIET", raising=False)
    monkeypatch.delenv("CROPI_VERBOSE", raising=False)
    from tqdm import tqdm

    bar = runtime.progress(total=3, file=_Tty())
    assert isinstance(bar, tqdm)
    bar.close()
    log = io.StringIO()
    bar = runtime.progress(total=3, desc="x", file=log)
    assert type(bar) is runtime.LineProgress and bar.interval == 30.0
    monkeypatch.setenv("CROPI_VERBOSE", "1")
    assert runtime.progress(total=3, file=_Tty()).interval == 0.0  # verbose: lines, even on a terminal
    monkeypatch.setenv("CROPI_QUIET", "1")  # quiet wins
    quiet = io.StringIO()
    with runtime.progress(total=3, file=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""


def test_lines_are_periodic_and_end_with_the_true_total(monkeypatch):
    monkeypatch.delenv("CROPI_QUIET", raising=False)
    monkeypatch.delenv("CROPI_VERBOSE", raising=False)
    monkeypatch.setenv("CROPI_PROGRESS_INTERVAL", "3600")
    log = io.StringIO()
    with runtime.progress(total=10, desc="score", unit="prompt", initial=4, file=log) as bar:
        for _ in range(6):
            bar.update(1)
        bar.set_postfix(reward="0.5")
    lines = log.getvalue().splitlines()
    assert len(lines) == 1  # nothing within the interval; one closing line
    assert lines[0].startswith("score: 10/10 prompt (100%)") and lines[0].endswith("reward=0.5")
    assert "\r" not in log.getvalue()
    monkeypatch.setenv("CROPI_PROGRESS_INTERVAL", "0")
    log = io.StringIO()
    with runtime.progress(total=2, desc="d", file=log) as bar:
        bar.update(1)
        bar.update(1)
    assert [ln.split(" it")[0] for ln in log.getvalue().splitlines()] == ["d: 1/2", "d: 2/2"]  # no repeat


def _rollout_lines(tmp_path, prompts, out, **kw):
    import contextlib

    from cropi import rollout

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rollout.rollout(prompts, out, n=2, max_new_tokens=4, chunk=2, **kw)
    return [ln for ln in err.getvalue().splitlines() if ln.startswith("rollout:")]


def test_rollout_total_is_the_row_count_and_resume_does_not_overcount(tmp_path, monkeypatch):
    """5 prompts in chunks of 2 (the last chunk has 1 row): the bar ends at 5/5, not 6/6, and a
    resumed run starts from the finished chunks' rows."""
    from cropi import schema

    monkeypatch.delenv("CROPI_QUIET", raising=False)
    monkeypatch.delenv("CROPI_VERBOSE", raising=False)
    monkeypatch.setenv("CROPI_PROGRESS_INTERVAL", "0")
    rows = [{"id": f"p{i}", "prompt": f"{i}+1=?\n", "answer": str(i + 1), "task": "t", "difficulty": 0,
             "split": "train"} for i in range(5)]
    prompts = schema.write_parquet_atomic(pa.Table.from_pylist(rows, schema=schema.PROMPT_SCHEMA), tmp_path / "p.parquet")
    lines = _rollout_lines(tmp_path, prompts, tmp_path / "t.parquet")
    counts = [re.match(r"rollout: (\d+)/(\d+)", ln).groups() for ln in lines]
    assert {t for _, t in counts} == {"5"}
    assert [int(n) for n, _ in counts] == [2, 4, 5]
    # an interrupted run left chunks 0 and 2 (rows 0-1 and 4): resume counts 3 done, 2 to go
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "t.parquet").replace_schema_metadata(None)
    parts = tmp_path / "r.parquet.parts"
    for c, (lo, hi) in {0: (0, 2), 2: (4, 5)}.items():
        schema.write_parquet_atomic(table.slice(lo, hi - lo), parts / f"chunk-{c:06d}.parquet")
    lines = _rollout_lines(tmp_path, prompts, tmp_path / "r.parquet", resume=True)
    counts = [re.match(r"rollout: (\d+)/(\d+)", ln).groups() for ln in lines]
    assert [(int(n), int(t)) for n, t in counts] == [(5, 5)]
    assert pq.read_table(tmp_path / "r.parquet").column("id").to_pylist() == [f"p{i}" for i in range(5)]


def test_trainer_says_once_that_tensorboard_is_missing(tmp_path, monkeypatch, capsys):
    import sys

    from cropi.train import logs

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    monkeypatch.setattr(logs, "TB_NOTICE", [])
    monkeypatch.delenv("CROPI_QUIET", raising=False)
    assert logs.tensorboard(tmp_path, 0) is None
    assert logs.tensorboard(tmp_path, 0) is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cropi[tb]" in err[0]
    assert not (tmp_path / "tb").exists()
