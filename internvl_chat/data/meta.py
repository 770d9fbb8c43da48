"""The screening of an annotation file, once, when its dataset is built (without torch).

Every line gets the verdict of formats.read_line; the usable ones are kept as raw bytes (half a million parsed
records would be copied into every loader worker), the rest are reported once, in one summary, with their line
numbers, instead of being found again by every loader worker in every epoch. What only loading can tell (an image
that does not decode, a sample longer than --max_seq_length) is still found when the sample is built.
"""

from dataclasses import dataclass, field
from pathlib import Path

from .formats import INTERNVL2_RULES, CachedFileLookup, ConversationRules, annotation_lines, read_line

# How many bad lines a summary names; the validator (internvl-validate-data) lists them all.
LINES_NAMED = 5


@dataclass
class ScreenedLines:
    """An annotation file's usable lines as (1-based line number, raw line), and its bad ones as (number, why)."""

    annotation: Path
    records: list[tuple[int, bytes]] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        named = ", ".join(f"line {number} ({why})" for number, why in self.problems[:LINES_NAMED])
        more = f" and {len(self.problems) - LINES_NAMED} more" if len(self.problems) > LINES_NAMED else ""
        total = len(self.records) + len(self.problems)
        return (
            f"{self.annotation}: {len(self.problems)} of {total:,} lines cannot be used: {named}{more} "
            f"(internvl-validate-data lists them all)"
        )


def screen_annotation(
    annotation: str | Path, root: str | Path, show_progress: bool = False, rules: ConversationRules = INTERNVL2_RULES
) -> ScreenedLines:
    """Every non-blank line of the annotation file, sorted into usable and bad ones under the template's rules."""
    annotation, root = Path(annotation), Path(root)
    lines = annotation_lines(annotation)
    exists = CachedFileLookup()
    screened = ScreenedLines(annotation)
    if show_progress and len(lines) >= 20_000:  # a second or more
        from tqdm import tqdm

        lines = tqdm(lines, desc=f"checking {annotation.name}", unit=" lines", mininterval=2, leave=False)
    for number, raw in lines:
        verdict = read_line(raw, root, exists, rules)
        if isinstance(verdict, str):
            screened.problems.append((number, verdict))
        else:
            screened.records.append((number, raw))
    return screened
