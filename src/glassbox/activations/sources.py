"""Where the texts of an extraction come from, one document at a time.

Offers:
    Source(texts, text_field="text")   wraps what ``extract`` accepts:
        a list / tuple of str           each string a document
        a path to a .txt file           each non-empty line a document
        a path to a .jsonl file         each line a JSON object (its ``text_field``) or a JSON string
        a datasets.Dataset              each row's ``text_field`` (``datasets`` is not a dependency:
                                        it is recognised by duck typing, never imported here)
        any other iterable of str       read once, in order
    .documents(skip=0) -> iterator of str     from document ``skip`` on (resuming)
    .count() -> int | None                    how many documents, where that is cheap to know
    .describe() -> str                        what the index records as the source

Documents are numbered from 0 in this order; the index and every stored row use that number.
Files are streamed line by line, so the corpus never sits in memory.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

_FILE_KINDS = (".txt", ".jsonl")


class Source:
    """The documents of one extraction.

        source = Source(["first text", "second text"])
        assert list(source.documents(skip=1)) == ["second text"]
    """

    def __init__(self, texts: Any, text_field: str = "text") -> None:
        self.text_field = text_field
        self.path: str | None = None
        self.texts: Any = None
        if isinstance(texts, (str, os.PathLike)):
            path = os.fspath(texts)
            if not path.endswith(_FILE_KINDS):
                raise ValueError(
                    f"texts={path!r}: a file must end in .txt (a document per line) or .jsonl (a JSON "
                    "object or string per line); to extract one text, pass a list: [text]"
                )
            if not os.path.isfile(path):
                raise FileNotFoundError(f"texts={path!r}: no such file")
            self.path = path
        elif _is_hf_dataset(texts):
            if texts.column_names is not None and text_field not in texts.column_names:
                raise ValueError(f"the dataset has no column {text_field!r} (text_field=); it has "
                                 f"{', '.join(texts.column_names)}")
            self.texts = texts
        elif isinstance(texts, Iterable) and not isinstance(texts, (bytes, dict)):
            self.texts = texts
        else:
            raise TypeError(
                f"texts must be a list of str, a .txt / .jsonl path or a datasets.Dataset, got "
                f"{type(texts).__name__}"
            )

    def documents(self, skip: int = 0) -> Iterator[str]:
        if self.path is not None:
            return itertools.islice(self._read_file(), skip, None)
        if _is_hf_dataset(self.texts):
            # rows are read one at a time (a column lookup would load the whole column)
            texts = (row[self.text_field] for row in self.texts)
            return _checked(itertools.islice(texts, skip, None), skip)
        if isinstance(self.texts, (list, tuple)):
            return _checked(iter(self.texts[skip:]), skip)
        return _checked(itertools.islice(iter(self.texts), skip, None), skip)

    def count(self) -> int | None:
        if self.path is not None:
            with open(self.path, "rb") as handle:
                return sum(1 for line in handle if line.strip())
        try:
            return len(self.texts)
        except TypeError:
            return None  # a generator: no ETA, only a rate

    def describe(self) -> str:
        if self.path is not None:
            return os.path.basename(self.path)
        return type(self.texts).__name__

    def _read_file(self) -> Iterator[str]:
        jsonl = self.path.endswith(".jsonl")  # type: ignore[union-attr]
        with open(self.path, encoding="utf-8") as handle:  # type: ignore[arg-type]
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue  # blank lines are not documents (numbering skips them)
                if not jsonl:
                    yield line.rstrip("\r\n")
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.path}, line {number}: not JSON ({err})") from None
                if isinstance(value, dict):
                    if self.text_field not in value:
                        raise ValueError(f"{self.path}, line {number}: no {self.text_field!r} field "
                                         f"(text_field=); it has {', '.join(value) or 'none'}")
                    value = value[self.text_field]
                if not isinstance(value, str):
                    raise ValueError(f"{self.path}, line {number}: the text is a "
                                     f"{type(value).__name__}, not a string")
                yield value


def _checked(texts: Iterator[Any], first: int) -> Iterator[str]:
    for number, text in enumerate(texts, first):
        if not isinstance(text, str):
            raise TypeError(f"document {number} is a {type(text).__name__}, not a str")
        yield text


def _is_hf_dataset(value: Any) -> bool:
    # Duck typing on the class's module: importing datasets here would make it a dependency.
    return type(value).__module__.startswith("datasets.") and hasattr(value, "column_names")
