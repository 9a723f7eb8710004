"""Real English text that is available offline, and its tokenization for text models.

Calibrating or evaluating a text model on random token ids measures the wrong thing
(activation ranges of real text differ), and no data set can be downloaded here. The
Python standard library's docstrings are real, varied English prose that every Python
installation carries: :func:`stdlib_sentences` takes the first paragraph of the
docstrings of a fixed, sorted list of stdlib modules and their public members, in a
deterministic order (the text can change between Python versions, never between runs).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import re
import warnings
from collections.abc import Sequence

import numpy as np

from compressor.errors import DataError

__all__ = ["STDLIB_MODULES", "stdlib_sentences", "tokenize_for"]

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
