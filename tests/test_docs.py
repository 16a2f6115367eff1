"""The docs stay true: docs/api.md's example runs, every file the docs link exists, and the
package's docstrings point to docs/, not to files outside the repository or to issue numbers."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["design.md", "glossary.md", "api.md", "real-models.md", "scale.md"]


def test_api_example_runs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    shutil.copytree(ROOT / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    exec(compile("\n".join(blocks), "docs/api.md", "exec"), {"__name__": "docs_api"})
    out = capsys.readouterr().out.splitlines()
    assert out[-3:] == ["score-folder", "stage", "run"]
    assert 0.0 <= float(out[-4]) <= 1.0  # the eval accuracy
    assert (tmp_path / "api-example" / "run" / "checkpoints" / "step-2").is_dir()


def test_docs_exist_and_links_resolve():
    for name in DOCS:
        assert (ROOT / "docs" / name).is_file(), name
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([^)#]+)\)", md.read_text(encoding="utf-8")):
            if "://" not in link:
                assert (md.parent / link).exists(), f"{md.name}: broken link {link}"


def test_glossary_covers_the_terms_users_meet():
    text = (ROOT / "docs" / "glossary.md").read_text(encoding="utf-8")
    terms = re.findall(r"\*\*(.+?)\*\*", text)
    names = {t.lower() for term in terms for t in re.split(r"\*\*|, | / ", term) if t.strip()}
    from cropi.export import FORMATS
    from cropi.select import SELECTORS

    wanted = {"popi", "rrf", "kron", "sjlt", "mask-dense", "vcrl", "learnability", "pass-band", "zero_signal",
              "behaviour policy", "stage", "curriculum", "cropi_quiet", "cropi_verbose", "check-rank", "rescore",
              "projector", "combine", "aggregation", "tiny", "smollm2", "verl", "trl"}
    wanted |= {s for s in SELECTORS if s != "full"} | {"dense", "identity", "trak"}
    missing = sorted(w for w in wanted if w not in names)
    assert not missing, f"glossary lacks {missing}"
    assert set(FORMATS) - {"jsonl"} <= names


def test_docstrings_cite_docs_not_outside_files_or_issues():
    bad = []
    for folder in ("cropi", "pipelines", "benchmarks"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            text = f.read_text(encoding="utf-8")
            for pattern in (r"DESIGN", r"\bissue \d+", r"\.\./shared"):
                if re.search(pattern, text):
                    bad.append(f"{f.relative_to(ROOT)}: {pattern}")
    assert not bad, bad
