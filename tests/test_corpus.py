"""Prose found on disk for training: roff and text documents to plain passages, eval set kept out."""

from __future__ import annotations

import gzip
from pathlib import Path

from compressor.corpus import disk_passages

MAN_PAGE = r""".\" A comment that is not prose at all, even though it is long enough.
.TH DEMO 1
.SH NAME
demo \- a demonstration
.SH DESCRIPTION
The \fBdemo\fR program copies standard input to standard output without
changing a single byte of it.
.PP
It reads the configuration from
.I /etc/demo.conf
before it starts, and exits with status zero when everything went well.
.TP
\fB\-v\fR, \fB\-\-verbose\fR
Print a line to standard error for every block of data that is copied.
.nf
demo < input.txt > output.txt && echo this is code and never prose at all.
.fi
The evaluation sentence that must never be trained on appears right here.
"""

README = """# Demo

Demo is a small tool that shows how documentation on disk becomes training text.

    pip install demo --and-this-is-code-that-is-never-taken-as-prose.

The evaluation sentence that must never be trained on appears right here. It also says more.

Demo is a small tool that shows how documentation on disk becomes training text.
"""


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    man = tmp_path / "man"
    (man / "man1").mkdir(parents=True)
    (man / "man1" / "demo.1.gz").write_bytes(gzip.compress(MAN_PAGE.encode()))
    (man / "de" / "man1").mkdir(parents=True)  # a translation: not English, not read
    (man / "de" / "man1" / "demo.1").write_text(".SH BESCHREIBUNG\nDas Programm demo kopiert die Eingabe in die Ausgabe.\n")
    doc = tmp_path / "doc" / "demo"
    doc.mkdir(parents=True)
    (doc / "README.md").write_text(README)
    (doc / "copyright").write_text("Copyright holders are listed in this file, which is not prose to learn.\n")
    return man, tmp_path / "doc"


EVAL = ["The evaluation sentence that must never be trained on appears right here."]


def test_disk_passages_are_plain_prose_without_the_eval_set(tmp_path):
    man, doc = _tree(tmp_path)
    got = disk_passages(100, EVAL, man_root=man, doc_root=doc, site_packages=[])
    assert sorted(got) == sorted([
        "The demo program copies standard input to standard output without changing a single byte of it.",
        "It reads the configuration from /etc/demo.conf before it starts, and exits with status zero when "
        "everything went well.",
        "Print a line to standard error for every block of data that is copied.",
        "Demo is a small tool that shows how documentation on disk becomes training text.",
    ])  # the option tag, the no-fill block, the code, the duplicate, the translation and the copyright are out


def test_disk_passages_are_deterministic_and_eval_disjoint_on_this_machine():
    from compressor.corpus import stdlib_sentences

    evaluation = stdlib_sentences(1000, 100)  # the benches' eval set: calib 100, then 1000
    first = disk_passages(3000, evaluation)
    assert first == disk_passages(3000, evaluation)
    folded = [" ".join(e.lower().split()) for e in evaluation]
    assert not any(e in " ".join(p.lower().split()) for p in first for e in folded)
    assert len(set(first)) == len(first)
