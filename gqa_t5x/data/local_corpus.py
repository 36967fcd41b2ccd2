"""A small real-text corpus found on the user's own machine, for the quickstart.

The repository carries no third-party text. The quickstart instead reads the
docstrings of the Python standard library installed on the machine it runs on
(real English prose written by people, present on every Python install) and
turns them into:

* a pre-training corpus (`text` field, one docstring per record) for T5's
  span corruption;
* a summarisation task: `article` = a docstring's body (and the signature of
  what it documents), `highlights` = its one-line summary — the PEP 257
  convention that a docstring's first line summarises the rest;
* a SentencePiece vocabulary trained on that text at run time, with T5's
  special ids (pad 0, eos 1, unk 2, no bos) so seqio and the tasks treat it
  exactly like the T5 vocabulary.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_MIN_BODY_WORDS = 12
_MAX_SUMMARY_WORDS = 30


@dataclasses.dataclass(frozen=True)
class Docstring:
    """One documented object of the standard library."""

    qualname: str  # e.g. 'json.decoder.JSONDecoder.decode'
    signature: str  # e.g. 'def decode(self, s, _w)'
    summary: str  # first line
    body: str  # the rest (paragraphs joined by newlines)

    @property
    def text(self) -> str:
        return f"{self.summary}\n{self.body}" if self.body else self.summary


def stdlib_dir() -> Path:
    """The installed standard library's source folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        return f"class {node.name}"
    assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    return f"def {node.name}({ast.unparse(node.args)})"


def _split(doc: str) -> tuple[str, str] | None:
    lines = [line.strip() for line in doc.strip().splitlines()]
    if not lines or not lines[0]:
        return None
    summary = lines[0]
    body_lines = [line for line in lines[1:] if line]
    body = " ".join(body_lines)
    if not summary.endswith(".") or len(summary.split()) > _MAX_SUMMARY_WORDS:
        return None
    if len(body.split()) < _MIN_BODY_WORDS:
        return None
    # Code examples and tables are not prose.
    if ">>>" in body or "|" in body:
        return None
    return summary, body


def iter_docstrings(root: Path | None = None) -> Iterator[Docstring]:
    """Yields prose docstrings of functions and classes under `root`.

    Args:
      root: A source folder; defaults to the standard library (site-packages
        and test suites excluded).
    """
    root = stdlib_dir() if root is None else Path(root)
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            split = _split(doc)
            if split is None:
                continue
            yield Docstring(f"{module}.{node.name}", _signature(node), *split)


def _split_name(qualname: str, validation_fraction: float) -> str:
    digest = hashlib.sha256(qualname.encode()).digest()
    return "validation" if digest[0] / 256.0 < validation_fraction else "train"


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def build_corpus(
    output_dir: str | os.PathLike,
    *,
    max_docs: int | None = None,
    validation_fraction: float = 0.1,
    vocab_size: int = 2000,
    seed: int = 0,
    root: Path | None = None,
) -> dict[str, Path]:
    """Writes the corpus, the summarisation task and a vocabulary.

    Args:
      output_dir: Folder to write into (created).
      max_docs: Keep at most this many docstrings (a seeded random subset).
      validation_fraction: Share of docstrings held out (split by name hash).
      vocab_size: SentencePiece pieces (100 sentinels are added by seqio).
      seed: Seed of the subset choice.
      root: Source folder (default: the standard library).

    Returns:
      Paths: 'pretrain_train', 'pretrain_validation', 'summarize_train',
      'summarize_validation' (JSONL) and 'vocab' (SentencePiece model).

    Raises:
      ValueError: too little text was found to train anything.
    """
    import sentencepiece as spm

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = list(iter_docstrings(root))
    seen: set[str] = set()
    unique = []
    for d in docs:
        if d.text not in seen:
            seen.add(d.text)
            unique.append(d)
    if max_docs is not None and len(unique) > max_docs:
        unique = random.Random(seed).sample(unique, max_docs)
        unique.sort(key=lambda d: d.qualname)
    if len(unique) < 50:
        raise ValueError(
            f"Only {len(unique)} usable docstrings found under "
            f"{root or stdlib_dir()}; the quickstart needs at least 50."
        )
    splits: dict[str, list[Docstring]] = {"train": [], "validation": []}
    for d in unique:
        splits[_split_name(d.qualname, validation_fraction)].append(d)
    paths: dict[str, Path] = {}
    for split, items in splits.items():
        paths[f"pretrain_{split}"] = out / f"pretrain_{split}.jsonl"
        _write_jsonl(paths[f"pretrain_{split}"], [{"text": d.text} for d in items])
        paths[f"summarize_{split}"] = out / f"summarize_{split}.jsonl"
        _write_jsonl(
            paths[f"summarize_{split}"],
            [
                {"id": d.qualname, "article": f"{d.signature}: {d.body}", "highlights": d.summary}
                for d in items
            ],
        )
    text_file = out / "vocab_training_text.txt"
    text_file.write_text("\n".join(d.text for d in unique) + "\n")
    prefix = out / "spm"
    spm.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        input_sentence_size=200_000,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    paths["vocab"] = prefix.with_suffix(".model")
    return paths
