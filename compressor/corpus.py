"""Real English text that is available offline, and its tokenization for text models.

Calibrating or evaluating a text model on random token ids measures the wrong thing
(activation ranges of real text differ), and no data set can be downloaded here. The
Python standard library's docstrings are real, varied English prose that every Python
installation carries: :func:`stdlib_sentences` takes the first paragraph of the
docstrings of a fixed, sorted list of stdlib modules and their public members, in a
deterministic order (the text can change between Python versions, never between runs).

More prose for training (never for evaluation) is on disk: :func:`disk_passages` reads
English manual pages (roff source, ``/usr/share/man/man*``), the README/Markdown/reST/text
files of ``/usr/share/doc`` and the long descriptions in installed packages' ``METADATA``,
turns them into plain paragraphs, keeps the ones that read as sentences (the same filter
as the docstrings), and leaves out every passage that equals or contains a passage the
caller excludes (the evaluation set).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib
import inspect
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from compressor.errors import DataError

__all__ = ["STDLIB_MODULES", "disk_passages", "stdlib_sentences", "tokenize_for"]

logger = logging.getLogger(__name__)

# Pure-Python, import-safe modules with well-written docstrings; sorted, never changed in
# place (append a new tuple instead) so that a given count/offset keeps its sentences.
STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "email.message", "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http.client",
    "http.cookiejar", "http.server", "imaplib", "inspect", "io", "ipaddress", "json", "locale", "logging",
    "logging.handlers", "lzma", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib",
    "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue", "quopri",
    "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree",
    "zipfile", "zipimport",
)

_MIN_CHARS = 40
_MAX_CHARS = 500
_MIN_WORDS = 6


def stdlib_sentences(count: int, offset: int = 0) -> list[str]:
    """``count`` English passages from stdlib docstrings, starting at ``offset``.

    Each passage is the first paragraph of one docstring (a module's, then its public
    classes', functions' and methods' in name order), whitespace collapsed; passages that
    are short, look like code or signatures, or repeat an earlier one are skipped.

    Raises:
        DataError: fewer than ``offset + count`` passages exist.
    """
    corpus = _corpus()
    if count < 0 or offset < 0 or offset + count > len(corpus):
        raise DataError(f"stdlib_sentences: asked for {count} passages from offset {offset}, "
                        f"but only {len(corpus)} exist")
    return list(corpus[offset:offset + count])


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    seen: set[str] = set()
    out: list[str] = []
    with warnings.catch_warnings():  # deprecated aliases (typing.io...) warn when their docs are read
        warnings.simplefilter("ignore")
        for module_name in STDLIB_MODULES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # a module missing from this build (e.g. no _lzma): skip it
                logger.debug("corpus: cannot import %s", module_name)
                continue
            for obj in _documented(module):
                text = _first_paragraph(inspect.getdoc(obj) or "")
                if text and text not in seen:
                    seen.add(text)
                    out.append(text)
    logger.debug("corpus: %d passages from %d modules", len(out), len(STDLIB_MODULES))
    return tuple(out)


def _documented(module: object) -> list[object]:
    """The module, then its public members defined in it (classes followed by their methods)."""
    objects: list[object] = [module]
    for name in sorted(vars(module)):
        member = vars(module)[name]
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(member):
            objects.append(member)
            objects.extend(v for k, v in sorted(vars(member).items())
                           if not k.startswith("_") and inspect.isfunction(v))
        elif inspect.isfunction(member):
            objects.append(member)
    return objects


def _first_paragraph(doc: str) -> str:
    paragraph = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return _prose(paragraph)


def _prose(paragraph: str) -> str:
    """``paragraph`` as one line of plain prose, or ``""`` when it does not read as sentences."""
    text = " ".join(paragraph.split())
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)  # reST roles, literals and emphasis to plain words
    text = re.sub(r"`+([^`]+)`+", r"\1", text)
    text = re.sub(r"\*(\w[^*]*)\*", r"\1", text)
    if not (_MIN_CHARS <= len(text) <= _MAX_CHARS) or len(text.split()) < _MIN_WORDS:
        return ""
    if not text[0].isupper() or text[-1] not in ".!?:" or ">>>" in text or "->" in text:
        return ""
    if re.match(r"^[\w.]+\(", text):  # a signature line, not prose
        return ""
    return text


MAN_ROOT = Path("/usr/share/man")
DOC_ROOT = Path("/usr/share/doc")
_PER_FILE = 40  # passages from one file at most, so that a prefix of the corpus spans many sources
_CHUNK_CHARS = 300  # a long paragraph is cut at sentence ends into passages of about this length
_DOC_NAME = re.compile(r"(readme[^/]*|[^/]*\.(md|markdown|rst|txt))(\.gz)?$", re.IGNORECASE)
_DOC_SKIP = re.compile(r"(copyright|license|licence|changelog|changes|authors|thanks|todo)", re.IGNORECASE)


def disk_passages(count: int, exclude: Iterable[str] = (), *, man_root: Path = MAN_ROOT,
                  doc_root: Path = DOC_ROOT, site_packages: Sequence[Path] | None = None) -> list[str]:
    """Up to ``count`` English prose passages from documentation files on this machine.

    Sources, each file read in a fixed order (sorted by a hash of its path, so that the
    first passages already come from many packages): English manual pages (``man1`` ..
    ``man8``, roff source with its macros and escapes removed, code blocks and option tags
    left out), README/Markdown/reST/text files under ``doc_root`` (plain or gzipped;
    copyright, licence and changelog files left out), and the description in every
    ``*.dist-info/METADATA`` of ``site_packages`` (default: this interpreter's). Each
    paragraph passes the filter of the docstring corpus; a long one is cut at sentence ends
    into passages of about 300 characters; at most 40 passages come from one file;
    duplicates are dropped.

    Args:
        count: Passages wanted (fewer are returned when the machine holds fewer).
        exclude: Passages that must not appear (the evaluation set): a passage equal to one
            of them, or containing one, is left out (compared with case and spacing folded).
        man_root, doc_root, site_packages: Where to look (tests point them at a folder).

    Returns:
        The passages; the same files give the same list.
    """
    banned = {_fold(t) for t in exclude if t.strip()}
    seen = set(banned)
    out: list[str] = []
    for path, kind in _doc_files(man_root, doc_root, site_packages):
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            logger.debug("corpus: cannot read %s (%s)", path, err)
            continue
        text = raw.decode("utf-8", errors="replace")
        paragraphs = _man_paragraphs(text) if kind == "man" else _text_paragraphs(text, kind == "metadata")
        taken = 0
        for passage in (p for para in paragraphs for p in _chunks(_prose(para) if len(para) <= _MAX_CHARS
                                                                   else _long_prose(para))):
            key = _fold(passage)
            if not _wordy(passage) or key in seen or any(b in key for b in banned):
                continue
            seen.add(key)
            out.append(passage)
            taken += 1
            if len(out) >= count:
                return out
            if taken >= _PER_FILE:
                break
    logger.debug("corpus: %d passages on disk (asked for %d)", len(out), count)
    return out


def _wordy(text: str) -> bool:
    """Most tokens are words (not options, paths, code): at least 70% purely alphabetic."""
    if re.search(r"&#?\w+;", text):  # HTML entities: markup, or a language written in emoji
        return False
    tokens = text.split()
    return sum(t.strip(".,;:!?()\"'").isalpha() for t in tokens) >= 0.7 * len(tokens)


def _fold(text: str) -> str:
    return " ".join(text.lower().split())


def _doc_files(man_root: Path, doc_root: Path, site_packages: Sequence[Path] | None) -> list[tuple[Path, str]]:
    files: list[tuple[Path, str]] = []
    if man_root.is_dir():  # English pages only: man_root/manN/, not man_root/<lang>/manN/
        files += [(p, "man") for d in sorted(man_root.glob("man[1-8]")) for p in d.iterdir() if p.is_file()]
    if doc_root.is_dir():
        files += [(p, "text") for p in doc_root.rglob("*") if p.is_file() and _DOC_NAME.search(p.name)
                  and not _DOC_SKIP.search(p.name)]
    roots = [Path(p) for p in sys.path if p.endswith("site-packages")] if site_packages is None else site_packages
    for root in dict.fromkeys(roots):
        if Path(root).is_dir():
            files += [(p, "metadata") for p in Path(root).glob("*.dist-info/METADATA")]
    return sorted(files, key=lambda f: hashlib.sha1(str(f[0]).encode()).hexdigest())


_FONT_MACROS = {"B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB"}
_BREAK_MACROS_SKIP_NEXT = {"TP"}  # the line after .TP is the tag (an option), not prose
_ROFF_ESCAPES = ((re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\s[+-]?\d+"), ""),
                 (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\\((em|en|hy)"), "-"),
                 (re.compile(r"\\\((lq|rq|dq)"), '"'), (re.compile(r"\\\((oq|cq|aq)"), "'"),
                 (re.compile(r"\\[-]"), "-"), (re.compile(r"\\[&|^c%]"), ""), (re.compile(r"\\[ ~0]"), " "),
                 (re.compile(r"\\e"), "\\\\"))


def _man_paragraphs(source: str) -> Iterator[str]:
    """Filled text paragraphs of a roff manual page (no-fill blocks and option tags left out)."""
    lines: list[str] = []
    fill, skip_next = True, False
    for line in source.splitlines():
        if line.startswith((".\\\"", "'\\\"", '.\\"')) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            name, _, args = line[1:].strip().partition(" ")
            if name in _FONT_MACROS and fill:
                words = re.findall(r'"([^"]*)"|(\S+)', args)
                lines.append(("" if len(name) == 2 else " ").join(a or b for a, b in words))
                continue
            if lines:
                yield _unescape(" ".join(lines))
                lines = []
            fill = {"nf": False, "EX": False, "fi": True, "EE": True}.get(name, fill)
            skip_next = name in _BREAK_MACROS_SKIP_NEXT
            continue
        if skip_next or not fill:
            skip_next = False
            continue
        if not line.strip():
            if lines:
                yield _unescape(" ".join(lines))
                lines = []
            continue
        lines.append(line)
    if lines:
        yield _unescape(" ".join(lines))


def _unescape(text: str) -> str:
    for pattern, replacement in _ROFF_ESCAPES:
        text = pattern.sub(replacement, text)
    return "" if "\\" in text else text


def _text_paragraphs(text: str, metadata: bool) -> Iterator[str]:
    """Paragraphs of a Markdown/reST/plain text file (a METADATA file: its description after the headers)."""
    if metadata:
        text = text.partition("\n\n")[2]
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip().splitlines()
        if not lines or any(l.startswith(("    ", "\t", "```", "..", "|", "+-", ">>>")) for l in lines):
            continue  # code, tables, directives
        block = " ".join(l.strip().lstrip("#").strip() for l in lines)
        block = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", block)  # Markdown links and images to their text
        yield re.sub(r"\*\*([^*]+)\*\*", r"\1", block)


def _long_prose(paragraph: str) -> str:
    """A long paragraph, kept whole when every sentence of it reads as prose (cut later by :func:`_chunks`)."""
    text = " ".join(paragraph.split())
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)
    return text if sentences and all(_prose(s) or len(s) < _MIN_CHARS for s in sentences) and _prose(sentences[0]) \
        else ""


def _chunks(text: str) -> list[str]:
    """``text`` cut at sentence ends into passages of about :data:`_CHUNK_CHARS` characters."""
    if not text:
        return []
    if len(text) <= _MAX_CHARS:
        return [text]
    out, current = [], ""
    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        if current and len(current) + len(sentence) + 1 > _CHUNK_CHARS:
            out.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}".strip()
    out.append(current)
    return [p for p in map(_prose, out) if p]


def tokenize_for(model_dir: str | os.PathLike, sentences: Sequence[str], seq_len: int, *,
                 input_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Tokenize ``sentences`` with the tokenizer of a Hugging Face model directory.

    Args:
        model_dir: A directory holding the tokenizer files (read offline).
        sentences: The texts.
        seq_len: Every row is padded or truncated to this many tokens.
        input_names: The model's inputs (e.g. from the captured graph); only those are
            returned. Default: ``input_ids``, ``attention_mask`` and ``token_type_ids``
            where the tokenizer produces them.

    Returns:
        int64 arrays of shape ``(len(sentences), seq_len)``, keyed by input name.

    Raises:
        DataError: the tokenizer cannot be loaded, or produces no input the model takes.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError("tokenize_for needs the transformers package: pip install 'compressor[transformers]'") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as err:
        raise DataError(f"{model_dir}: cannot load a tokenizer ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no message'})") from None
    encoded = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=seq_len,
                        return_tensors="np")
    wanted = tuple(input_names) if input_names is not None else ("input_ids", "attention_mask", "token_type_ids")
    missing = [n for n in wanted if n not in encoded and input_names is not None]
    if missing:
        raise DataError(f"{model_dir}: the tokenizer produces {', '.join(encoded)} but not {', '.join(missing)}")
    return {n: np.asarray(encoded[n], dtype=np.int64) for n in wanted if n in encoded}
