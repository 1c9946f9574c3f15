"""What the benchmarks print and write: markdown tables, ratio columns, the rows as JSON and
the docs/BENCHMARKS.md editor.

Every benchmark prints its table; only ``--report [PATH]`` writes it to docs/BENCHMARKS.md,
as the current table of its benchmark (:func:`update_report`).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import torch

REPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "BENCHMARKS.md")


def machine_description(device: str) -> str:
    """The GPU's name, or the CPU's core count and model, with the torch version."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {cpu}, no GPU used (torch {torch.__version__})"


def markdown_table(rows: List[Dict], columns: List[str]) -> str:
    """``rows`` as a markdown table of ``columns`` (a missing value is an empty cell)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


CURRENT_HEADING = "## Current results"
HISTORY_HEADING = "## History"
HISTORY_INTRO = "Superseded runs, newest first."
_REPORT_END = "<!-- /report -->"
_SKELETON = (
    "# Benchmarks\n\nEvery table below is written by a script in `tools/` with `--report`, which replaces the "
    "current table of its benchmark and machine kind and moves the one it replaces to the history.\n\n"
    f"{CURRENT_HEADING}\n\n{HISTORY_HEADING}\n\n{HISTORY_INTRO}\n"
)


def update_report(path: str, title: str, command: str, device: str, body: str) -> str:
    """Write a run (command, machine, date, commit, ``body``) as the current table of its
    benchmark and machine kind (``title`` + GPU/CPU) in docs/BENCHMARKS.md.

    The section it replaces moves, unchanged, to the top of the history section; a first
    run of its kind goes at the end of the current results. Returns the section's key.
    """
    key = f"{title} ({'GPU' if device.startswith('cuda') else 'CPU'})"
    begin = f"<!-- report: {key} -->"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=False).stdout.strip()
    except OSError:
        rev = ""
    section = (f"{begin}\n### {key}\n\n- command: `{command}`\n- machine: {machine_description(device)}\n"
               f"- date: {when}" + (f" (commit {rev})" if rev else "") + f"\n\n{body.strip()}\n{_REPORT_END}\n")
    text = open(path).read() if os.path.exists(path) else _SKELETON
    for heading in (CURRENT_HEADING, HISTORY_HEADING):
        if heading not in text:
            text = text.rstrip("\n") + f"\n\n{heading}\n"
    if begin in text:
        i = text.index(begin)
        j = text.index(_REPORT_END, i) + len(_REPORT_END)
        old = text[i + len(begin):j - len(_REPORT_END)].strip("\n")
        text = text[:i] + section.rstrip("\n") + text[j:]
        h = text.index(HISTORY_HEADING)
        intro = text.find(HISTORY_INTRO, h)
        at = intro + len(HISTORY_INTRO) if intro != -1 else h + len(HISTORY_HEADING)
        text = text[:at] + "\n\n" + old + text[at:]
    else:
        h = text.index(HISTORY_HEADING)
        text = text[:h].rstrip("\n") + "\n\n" + section + "\n" + text[h:]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return key


def print_and_report(script: str, table: str, summary: str, report: str | None, title: str, device: str,
                     body: str) -> None:
    """Print the table and a one-line summary; with ``--report PATH``, write ``body`` to PATH
    as the current section ``title`` (:func:`update_report`), naming the command line
    (``python tools/SCRIPT ...``, ``script`` being the tool's file name)."""
    print(table)
    if summary:
        print(summary)
    if report:
        command = (f"python tools/{os.path.basename(script)} " + " ".join(sys.argv[1:])).strip()
        key = update_report(report, title, command, device, body)
        print(f"updated '{key}' in {report}")


def write_rows_json(path: Optional[str], rows: List[Dict]) -> None:
    """``--json PATH``: the measured rows, for a script that checks targets across benchmarks."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def add_ratio_columns(rows: List[Dict], reference: Dict, name: str, cuda: bool) -> Tuple[str, str, str]:
    """Add ``train time vs NAME``, ``train memory vs NAME`` and ``infer vs NAME`` (``1.23x``)
    to every row of :func:`revcolv2_bench.detectron2_runs.detectron2_train_infer` figures,
    relative to ``reference``.

    Returns the (training step, inference speed, training memory) columns the ratios use: on
    a CPU they are process CPU time, which other load on the machine does not inflate, and the
    memory forward + backward adds.
    """
    step = "train s/step" if cuda else "train CPU-s/step"
    speed = "infer img/s" if cuda else "infer img/CPU-s"
    mem = "train peak GPU mem (GiB)" if cuda else "fwd+bwd adds (MB)"
    for r in rows:
        r[f"train time vs {name}"] = f"{r[step] / reference[step]:.2f}x"
        r[f"train memory vs {name}"] = f"{r[mem] / reference[mem]:.2f}x"
        r[f"infer vs {name}"] = f"{r[speed] / reference[speed]:.2f}x"
    return step, speed, mem


# the CPU caveat of the detectron2 model benchmarks' reports; each script adds its GPU targets
CPU_RATIO_NOTE = ("CPU run: the ratios use process CPU time (all threads), which other load does not inflate; "
                  "2-core ratios are not GPU ratios, and the memory columns count activations (saved for backward, "
                  "or added by forward + backward), not the allocator's peak with weights and optimizer state. ")
