"""Reading records: ``builtin:NAME`` (the embedded world), ``.txt`` (raw text) and ``.jsonl`` (one JSON object a
line). Every record is validated before training starts; a bad one is a :class:`DataError` naming ``file:line``
and the field, so a run never dies at step 10,000 on record 9,999,999.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tuneforge.errors import DataError

__all__ = ["Records", "read_records", "held_out_source", "holdout_cut", "split_held_out", "BUILTIN_PREFIX",
           "shorten"]

BUILTIN_PREFIX = "builtin:"


@dataclasses.dataclass
class Records:
    """Validated records and where each came from (``file:line``), for messages about a single record."""

    items: list[dict]
    where: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


def _type_label(tp) -> str:
    if isinstance(tp, tuple):
        return " or ".join(t.__name__ for t in tp)
    return tp.__name__


def read_records(spec: str, *, split: str = "train", fields: dict[str, type | tuple] | None = None) -> Records:
    """Read and validate the records of ``spec``.

    :param spec: ``builtin:NAME`` (``split`` picks train/test), a ``.txt`` file (one record ``{"text": ...}``
        holding the whole file) or a ``.jsonl`` file.
    :param fields: the fields each record must have and their types, as the objective names them
        (e.g. ``{"text": str}``); missing or mistyped fields are errors.
    :raises DataError: missing file, unknown format, invalid JSON, a record that is not an object, a missing
        or mistyped field; the message names ``file:line`` and the field.
    """
    fields = fields or {}
    if spec.startswith(BUILTIN_PREFIX):
        from tuneforge.data import world

        name = spec[len(BUILTIN_PREFIX):]
        try:
            items = world.builtin(name, split=split)
        except ValueError as exc:
            raise DataError(f"{spec}: {exc}") from None
        where = [f"{spec}[{split}]#{i}" for i in range(len(items))]
    else:
        path = Path(spec)
        if not path.is_file():
            from tuneforge.data.world import BUILTIN_DATASETS

            raise DataError(
                f"data '{spec}' is not a file. Give a .txt or .jsonl file, or one of the embedded datasets "
                + ", ".join(BUILTIN_PREFIX + name for name in BUILTIN_DATASETS) + "."
            )
        if path.suffix == ".txt":
            data = _read_bytes(path)
            try:
                items = [{"text": data.decode("utf-8")}]
            except UnicodeDecodeError as exc:
                line = data.count(b"\n", 0, exc.start) + 1
                raise DataError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file "
                                "as UTF-8") from None
            where = [f"{path}:1"]
        elif path.suffix == ".jsonl":
            items, where = _read_jsonl(path)
        else:
            raise DataError(f"{path}: unknown data format '{path.suffix}'; use .txt (raw text) or .jsonl (records)")
    for item, loc in zip(items, where):
        for field, tp in fields.items():
            if field not in item:
                chat = ("; it is a chat record: train on it with -m sft (docs/instruction-tuning.md)"
                        if "messages" in item or {"prompt", "completion"} <= item.keys() else "")
                raise DataError(
                    f"{loc}: field '{field}' is missing (this objective needs {', '.join(map(repr, fields))}; "
                    f"the record has {', '.join(map(repr, item)) or 'no fields'}){chat}"
                )
            value = item[field]
            # bool is a subclass of int in Python, but true/false is never a valid count or id
            wrong_bool = isinstance(value, bool) and bool not in _as_tuple(tp)
            if not isinstance(value, tp) or wrong_bool:
                raise DataError(
                    f"{loc}: field '{field}' must be {_type_label(tp)}, got {type(value).__name__} {shorten(value)}"
                )
    if not items:
        raise DataError(f"{spec}: no records")
    return Records(items, where, spec)


def held_out_source(config) -> tuple[str, str] | None:
    """Where an objective's held-out records come from, as ``(spec, split)``: ``--eval-data`` when given, else the
    builtin dataset's test split; None when the objective must hold out the tail of its training file."""
    spec = config.eval_data or (config.data if config.data.startswith(BUILTIN_PREFIX) else None)
    if spec is None:
        return None
    return spec, "test" if spec.startswith(BUILTIN_PREFIX) else "train"


def holdout_cut(n: int, holdout: float) -> int:
    """How many of a file's ``n`` records train when its last ``holdout`` share is held out (at least one is held
    out when ``holdout > 0`` and there are two or more)."""
    return n - max(1, int(n * holdout)) if holdout > 0 and n > 1 else n


def split_held_out(config, read, holdout: float):
    """(training, held-out) records of a run: ``read(spec, split)`` returns sliceable records; held out are
    ``--eval-data``, else the builtin test split, else the training file's last ``holdout`` share (which then
    never trains)."""
    train = read(config.data, "train")
    source = held_out_source(config)
    if source is not None:
        return train, read(*source)
    cut = holdout_cut(len(train), holdout)
    return train[:cut], train[cut:]


def _as_tuple(tp) -> tuple:
    return tp if isinstance(tp, tuple) else (tp,)


def shorten(value, n: int = 40) -> str:
    """A value as JSON (its repr when it is not JSON), cut to ``n`` characters: a record's field in a message."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"data '{path}' cannot be read ({exc.strerror or exc}); check its permissions") from None


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    items, where = [], []
    # Bytes, decoded a line at a time: a text-mode file decodes ahead in blocks, so its decoding error would
    # surface while an earlier line is being read and name the wrong line.
    for lineno, raw in enumerate(_read_bytes(path).splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not UTF-8 ({exc.reason} at column {exc.start + 1}); save the file "
                            "as UTF-8") from None
        if not line.strip():
            continue  # blank lines (a trailing newline, say) are not records
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: a record must be a JSON object, got {type(record).__name__}")
        items.append(record)
        where.append(f"{path}:{lineno}")
    return items, where
