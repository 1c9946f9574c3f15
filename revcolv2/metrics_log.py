"""The metrics log of a training run: one record a line, strict JSON (``log.jsonl`` of the
classification tools, detectron2's ``metrics.json``), and trimming it to the step a resumed
run starts from."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Dict, List, NamedTuple

from .atomic_io import write_text_atomic

LOG_FILE = "log.jsonl"


def json_line(record: Dict[str, Any]) -> str:
    """``record`` as one line of strict JSON: NaN and infinities, which JSON has no
    spelling for (Python would write the invalid tokens ``NaN`` / ``Infinity``), become
    ``null``."""
    return json.dumps(json_compatible(record), allow_nan=False)


def json_compatible(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, in nested dicts,
    lists and tuples too."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_compatible(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_compatible(v) for v in obj]
    return obj


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class JsonLines(NamedTuple):
    included: List[str]   # the lines that stay, as they were
    past: int             # records that ``include`` left out
    malformed: List[int]  # line numbers (1-based) of the malformed records, left out too


def split_json_lines(path: str, key: str, include: Callable[[float], bool], log=print) -> JsonLines:
    """Sort the lines of the JSON-lines log ``path`` into those that stay and those left out.

    A record stays when it has no ``key`` or when ``include(record[key])`` is true. A line
    that is not a JSON object (cut short by a kill, edited by hand) or whose ``key`` is not
    a number is malformed: it is left out, and one warning through ``log`` counts such lines
    and names the file and their line numbers.
    """
    with open(path) as f:
        lines = f.read().splitlines()
    included, past, malformed = [], 0, []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or (key in record and not _is_number(record[key])):
            malformed.append(number)
        elif key in record and not include(record[key]):
            past += 1
        else:
            included.append(line)
    if malformed and log is not None:
        shown = ", ".join(map(str, malformed[:10])) + (" ..." if len(malformed) > 10 else "")
        log(f"warning: {path}: skipped {len(malformed)} malformed record(s) (not a JSON object, or "
            f"'{key}' not a number) at line(s) {shown}")
    return JsonLines(included, past, malformed)


def trim_log(path: str, step: int, log=print) -> int:
    """Drop the records of a JSON-lines log whose ``step`` is past ``step`` (they belong to
    training that a resume repeats), and its malformed records (with a warning naming
    them, see :func:`split_json_lines`); the shorter log replaces the file atomically.
    Returns how many records past ``step`` were dropped."""
    if not os.path.isfile(path):
        return 0
    lines = split_json_lines(path, "step", lambda s: s <= step, log)
    if lines.past or lines.malformed:
        write_text_atomic(path, "".join(line + "\n" for line in lines.included))
    return lines.past
