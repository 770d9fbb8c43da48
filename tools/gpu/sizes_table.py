#!/usr/bin/env python3
"""The per-size tables of tools/gpu/sizes_check.sh from the JSON files it leaves in OUT_DIR: caption evaluation
(eval_<size>.json), training modes (train_<size>.json) and peak memory (memory_<size>_batch<N>.json), as markdown.

  python3 tools/gpu/sizes_table.py OUT_DIR
"""

import argparse
import json
import re
from pathlib import Path

# The cards people plan for, by memory; a run fits one when its peak allocation leaves about 2 GB for the CUDA
# context, the allocator's fragmentation and the loader.
CARDS_GB = (16, 24, 40, 48, 80, 141)
HEADROOM_GB = 2.0
SIZES = ("InternVL2-1B", "InternVL2-2B", "InternVL2-4B", "InternVL2-8B", "InternVL2-26B")


def size_key(path: Path) -> int:
    match = re.search(r"InternVL2-\d+B", path.name)
    return SIZES.index(match.group()) if match and match.group() in SIZES else len(SIZES)


def smallest_card(peak_gb: float | None) -> str:
    if peak_gb is None:
        return ""
    fitting = [card for card in CARDS_GB if peak_gb + HEADROOM_GB <= card]
    return f"{fitting[0]} GB" if fitting else "none of one card"


def evaluation_table(folder: Path) -> list[str]:
    lines = [
        "| size | images | chat() batch 1, images/s | fast engine | batch | images/s | speed-up | seconds | peak GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(folder.glob("eval_*.json"), key=size_key):
        report = json.loads(path.read_text())
        baseline, *fast = report["rows"]
        for row in fast:
            lines.append(
                f"| {report['model']} | {row['images']} | {baseline['images_per_s']} | {row['path']} | {row['batch']} "
                f"| {row['images_per_s']} | {row['speedup']}x | {row['seconds']} | {row['peak_memory_gb']} |"
            )
    return lines


def training_table(folder: Path) -> list[str]:
    lines = ["| size | mode | captions/s | vs faithful | peak GB | loss: first, last |", "|---|---|---|---|---|---|"]
    for path in sorted(folder.glob("train_*.json"), key=size_key):
        size = path.stem.removeprefix("train_")
        rows = json.loads(path.read_text())["rows"]
        baseline = rows[0].get("repeat_captions_per_s")
        for row in rows:
            if "error" in row:
                lines.append(f"| {size} | {row['mode']} | {row['error']} | | | |")
                continue
            rate = row["repeat_captions_per_s"]
            lines.append(
                f"| {size} | {row['mode']} | {rate} | {rate / baseline:.2f}x | {row['peak_memory_gb']} | "
                f"{row['losses'][0]:.4f}, {row['losses'][-1]:.4f} |"
            )
    return lines


def memory_table(folder: Path) -> list[str]:
    lines = [
        "| size | per-device batch | mode | peak GB | smallest card that fits | captions/s |",
        "|---|---|---|---|---|---|",
    ]
    for path in sorted(folder.glob("memory_*.json"), key=lambda p: (size_key(p), -int(p.stem.rsplit("batch")[-1]))):
        size, batch = re.match(r"memory_(.+)_batch(\d+)", path.stem).groups()
        for row in json.loads(path.read_text())["rows"]:
            if "error" in row:
                fits = "out of memory" if "OutOfMemory" in row["error"] else row["error"][:80]
                lines.append(f"| {size} | {batch} | {row['mode']} | | {fits} | |")
                continue
            peak, rate = row["peak_memory_gb"], row["repeat_captions_per_s"]
            lines.append(f"| {size} | {batch} | {row['mode']} | {peak} | {smallest_card(peak)} | {rate} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    folder = parser.parse_args().folder
    device = next((json.loads(p.read_text()).get("device") for p in sorted(folder.glob("*.json"))), None)
    print(f"{device}\n")
    for title, table in (
        ("Caption evaluation", evaluation_table(folder)),
        ("Training modes", training_table(folder)),
        ("Peak memory of LoRA fine-tuning", memory_table(folder)),
    ):
        if len(table) > 2:
            print(f"### {title}\n")
            print("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
