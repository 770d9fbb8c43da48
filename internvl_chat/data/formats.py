"""The on-disk formats of the fine-tuning and evaluation data, and the one verdict on each of their records.

Every reader of these files (the dataset's screening and its loading, the validator, the launcher's checks, the
evaluation, the synthetic COCO writer) asks this module, so that a line the validator passes is a line the
fine-tune trains on, and a line it fails is one the fine-tune skips, for the same reason. No torch: the checks run
before any process starts.
"""

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..model.conversation import IMAGE_PLACEHOLDER

# The caption question of the Karpathy COCO conversations and of the caption evaluation (the original's).
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."

# The Karpathy COCO layout under a COCO root (FORMAT.md section 4.4).
ANNOTATIONS_FOLDER = "annotations"
KARPATHY_TRAIN_JSONL = "coco_karpathy_train_567k.jsonl"
KARPATHY_TEST_JSON = "coco_karpathy_test.json"
KARPATHY_TEST_GT_JSON = "coco_karpathy_test_gt.json"

HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class MetaError(ValueError):
    """A meta file or one of its entries that cannot be used; the message names the file and the entry."""


class SampleError(ValueError):
    """A sample that cannot be trained on (bad conversation, too long, ...)."""


# ----------------------------------------------------------------------------------------------- meta file


@dataclass(frozen=True)
class MetaEntry:
    """One dataset of a meta file (shell/data/coco_caption.json format), its paths resolved against the data root."""

    name: str
    root: Path
    annotation: Path
    repeat_time: float = 1
    data_augment: bool = False
    max_dynamic_patch: int | None = None  # None: the run's --max_dynamic_patch
    length: int | None = None  # the annotation's line count as the meta file states it (not checked by training)


def read_meta_file(meta_path: str | Path) -> dict:
    """The meta file's raw {name: entry} mapping; MetaError when it is missing, not JSON or not such a mapping."""
    meta_path = Path(meta_path)
    if not meta_path.is_file():
        raise MetaError(f"meta file {meta_path} does not exist")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MetaError(f"meta file {meta_path} is not valid JSON: {error}") from error
    if not isinstance(meta, dict) or not meta:
        raise MetaError(f"meta file {meta_path} must map dataset names to {{root, annotation, ...}}")
    return meta


def _seen_from(path: Path) -> str:
    """Where a relative path was looked for: the launchers resolve it against the folder they run in."""
    return "" if path.is_absolute() else f" (relative to {Path.cwd()})"


def meta_entry(meta_path: str | Path, name: str, raw, data_root: str | Path | None = None) -> MetaEntry:
    """One raw meta entry checked and resolved (an absolute path stays as it is); MetaError names what is wrong."""
    where = f"{meta_path}: dataset {name!r}"
    if not isinstance(raw, dict):
        raise MetaError(f"{where} must be an object with 'root' and 'annotation'")
    for key in ("root", "annotation"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise MetaError(f"{where} has no {key!r} path")
    base = Path(data_root) if data_root else Path()
    root, annotation = base / raw["root"], base / raw["annotation"]
    if annotation.suffix != ".jsonl":
        raise MetaError(f"{where}: annotation {annotation} must be a .jsonl file (one JSON object per line)")
    if not annotation.is_file():
        raise MetaError(
            f"{where}: annotation {annotation} does not exist{_seen_from(annotation)} "
            f"(run tools/prepare_coco.sh, or tools/make_synthetic_coco.py for a synthetic set)"
        )
    if not root.is_dir():
        raise MetaError(f"{where}: image root {root} does not exist{_seen_from(root)}")
    repeat_time = raw.get("repeat_time", 1)
    if (
        not isinstance(repeat_time, (int, float))
        or isinstance(repeat_time, bool)
        or repeat_time <= 0
        or (repeat_time > 1 and repeat_time != int(repeat_time))
    ):
        raise MetaError(
            f"{where}: repeat_time must be a fraction below 1 (keep the first part) or a whole number "
            f"(repeat the whole file), got {repeat_time!r}"
        )
    data_augment = raw.get("data_augment", False)
    if not isinstance(data_augment, bool):
        raise MetaError(f"{where}: data_augment must be true or false, got {data_augment!r}")
    for key, least in (("max_dynamic_patch", 1), ("length", 0)):
        value = raw.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise MetaError(f"{where}: {key} must be a whole number of at least {least}, got {value!r}")
    return MetaEntry(name, root, annotation, repeat_time, data_augment, raw.get("max_dynamic_patch"), raw.get("length"))


def load_meta(meta_path: str | Path, data_root: str | Path | None = None) -> list[MetaEntry]:
    """Every dataset of the meta file, in file order; relative paths are resolved against data_root (default: the
    current folder). MetaError at the first problem."""
    return [meta_entry(meta_path, name, raw, data_root) for name, raw in read_meta_file(meta_path).items()]


# ----------------------------------------------------------------------------------------------- annotation lines


@dataclass(frozen=True)
class ConversationRules:
    """How a template's preprocessing in the original reads a conversation: the one place that says it.

    InternVL2's templates (`preprocess_internlm`, `preprocess_mpt`, `preprocess_phi3`) drop a leading system turn
    for the template's own system message, render the whole conversation as one string and count each part's
    tokens to find the answers; an empty answer breaks that rendering, so it is refused. Only internlm2-chat's
    strips every value (Hermes-2's and phi3-chat's keep them as written).
    `internvl2_5` (`preprocess_internvl2_5`) keeps a leading system turn's value verbatim as the system message,
    keeps values as written, tokenises turn by turn (so an empty answer is a valid, supervised `<|im_end|>`), and
    expands `<image>` in human turns only: one in an answer is text."""

    template: str
    keep_system_turn: bool
    strip_values: bool
    allow_empty_answers: bool
    images_in_answers: bool  # does an <image> in a gpt turn stand for a picture?
    turn_by_turn: bool  # tokenise each turn on its own (else the whole rendered string, counted piecewise)

    def __post_init__(self):
        if self.turn_by_turn and self.images_in_answers:
            raise ValueError("turn-by-turn tokenisation expands <image> in human turns only")

    def placeholders(self, turns) -> int:
        """How many of the conversation's <image> placeholders stand for pictures."""
        return sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns if self.images_in_answers or role == "human")


INTERNVL2_5_TEMPLATE = "internvl2_5"


def conversation_rules(template: str) -> ConversationRules:
    """The rules of the preprocessing the original picks for this template name (its get_preprocess_function)."""
    if template == INTERNVL2_5_TEMPLATE:
        return ConversationRules(
            template,
            keep_system_turn=True,
            strip_values=False,
            allow_empty_answers=True,
            images_in_answers=False,
            turn_by_turn=True,
        )
    return ConversationRules(
        template,
        keep_system_turn=False,
        strip_values=template == "internlm2-chat",
        allow_empty_answers=False,
        images_in_answers=True,
        turn_by_turn=False,
    )


# The rules of the InternVL2 launchers' templates: the default of every reader that is not told a template.
INTERNVL2_RULES = conversation_rules("internlm2-chat")


@dataclass(frozen=True)
class ConversationLine:
    """A usable annotation line: what the dataset builds a sample from."""

    images: tuple[str, ...]  # as the line names them, relative to the dataset root; empty for a text-only line
    turns: tuple[tuple[str, str], ...]  # (human | gpt, text as the rules keep it), alternating, starting with human
    length: int | None  # the line's own token count, if it states one (the length-grouped sampler uses it)
    system: str | None = None  # the line's own system message (a leading system turn the rules keep)


@dataclass(frozen=True)
class CleanedConversation:
    """A conversation as the rules read it: its turns and, where the rules keep one, its own system message."""

    turns: list[tuple[str, str]]
    system: str | None = None


def clean_conversation(conversations, rules: ConversationRules = INTERNVL2_RULES) -> CleanedConversation:
    """The conversation under the template's rules (ConversationRules): a leading non-human turn is the system
    message (kept, for a `system` turn, or dropped), turns alternate human/assistant (either spelling), there is an
    answer to train on, and an empty answer only where the rules allow it. A conversation may end with a human turn
    after its answers, as the original's preprocessing allows; that turn is then not supervised. (Stricter than the
    original, which trains on whatever it is given: a conversation out of order is refused here, with the reason.)"""
    if not isinstance(conversations, list):
        raise SampleError("'conversations' must be a list of {from, value} turns")
    for index, turn in enumerate(conversations):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise SampleError(f"conversations[{index}] must be an object with string 'from' and 'value'")
    dropped = 1 if conversations and conversations[0]["from"] not in HUMAN_ROLES else 0
    system = None
    if dropped and rules.keep_system_turn:
        if conversations[0]["from"] != "system":
            raise SampleError(
                f"conversations[0] is from {conversations[0]['from']!r}; a conversation starts with a human turn "
                "(or a system turn before it)"
            )
        system = conversations[0]["value"]
    turns = conversations[dropped:]
    if not turns:
        raise SampleError("the conversation has no human turn")
    cleaned = []
    for index, turn in enumerate(turns):
        expected = HUMAN_ROLES if index % 2 == 0 else ASSISTANT_ROLES
        if turn["from"] not in expected:
            raise SampleError(
                f"conversations[{index + dropped}] is from {turn['from']!r}; turns must alternate human/gpt "
                f"(or user/assistant)"
            )
        text = turn["value"].strip() if rules.strip_values else turn["value"]
        cleaned.append(("human" if index % 2 == 0 else "gpt", text))
    if not rules.allow_empty_answers and any(role == "gpt" and not text.strip() for role, text in cleaned):
        raise SampleError(
            f"an answer (gpt turn) is empty (the {rules.template} template's preprocessing cannot train on one; "
            f"{INTERNVL2_5_TEMPLATE}'s can)"
        )
    if all(role == "human" for role, _ in cleaned):
        raise SampleError("the conversation has no answer (gpt turn) to train on")
    return CleanedConversation(cleaned, system)


def _image_names(image) -> tuple[str, ...]:
    if image is None:
        return ()
    if isinstance(image, str) and image:
        return (image,)
    if isinstance(image, list) and all(isinstance(name, str) and name for name in image):
        return tuple(image)
    raise SampleError(f"'image' must be a path or a list of paths, got {image!r}")


def read_line(
    raw: bytes | str,
    root: str | Path,
    exists: Callable[[str], bool] = os.path.isfile,
    rules: ConversationRules = INTERNVL2_RULES,
):
    """The verdict on one annotation line: a ConversationLine, or why the line cannot be used (a string).

    Everything the line and the file system can tell is decided here; what only loading can tell (an image that
    does not decode, a sample longer than --max_seq_length) is not. `exists` is how an image file is looked up
    (a cached lookup where many lines share a picture); `rules` are the run's template's (conversation_rules)."""
    if not raw.strip():
        return "empty line"
    try:
        item = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"not valid JSON: {getattr(error, 'msg', error)}"
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        return "not a JSON object with a 'conversations' list"
    try:
        images = _image_names(item.get("image"))
        conversation = clean_conversation(item["conversations"], rules)
    except SampleError as error:
        return str(error)
    placeholders = rules.placeholders(conversation.turns)
    if placeholders and placeholders != len(images):
        return (
            f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s); write none (they are "
            f"added before the first question) or one for each image"
            + ("" if rules.images_in_answers else " (in the human turns: one in an answer is text)")
        )
    length = item.get("length")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 0):
        return f"'length' must be a whole number of tokens, got {length!r}"
    for name in images:
        if not exists(str(Path(root) / name)):
            return f"image {name} not found under {root}"
    return ConversationLine(images, tuple(conversation.turns), length, conversation.system)


class CachedFileLookup:
    """os.path.isfile that asks the file system once per path: a picture has several captions. A plain object,
    so that a dataset holding one pickles into spawned loader workers."""

    def __init__(self):
        self.found: dict[str, bool] = {}

    def __call__(self, path: str) -> bool:
        if path not in self.found:
            self.found[path] = os.path.isfile(path)
        return self.found[path]


def annotation_lines(annotation: str | Path) -> list[tuple[int, bytes]]:
    """(1-based line number, raw line) of every line that is not blank: a blank line, a trailing one say, is no
    sample and no mistake, for every reader."""
    with open(annotation, "rb") as handle:
        return [(number, raw) for number, raw in enumerate(handle, 1) if raw.strip()]


# ----------------------------------------------------------------------------------------------- Karpathy COCO


def image_id_from_name(name: str) -> int:
    """The evaluation's rule: 'val2014/COCO_val2014_000000391895.jpg' -> 391895."""
    return int(name.split("_")[-1][:-4])


def coco_ground_truth(pictures: Iterable[tuple[dict, list[str]]], info: dict | None = None) -> dict:
    """The COCO caption ground truth pycocotools loads: each picture's `images` record (at least its "id") and its
    reference captions, the captions numbered from 1 in order."""
    pictures = list(pictures)
    references = [(image["id"], caption) for image, captions in pictures for caption in captions]
    return {
        "info": info if info is not None else {},
        "licenses": [],
        "type": "captions",
        "images": [image for image, _ in pictures],
        "annotations": [
            {"image_id": image_id, "caption": caption, "id": number}
            for number, (image_id, caption) in enumerate(references, 1)
        ],
    }


def write_ground_truth(path: str | Path, pictures: Iterable[tuple[dict, list[str]]], info: dict | None = None) -> Path:
    """coco_ground_truth written through a temporary name, so an interrupted run never leaves half a file."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(coco_ground_truth(pictures, info)), encoding="utf-8")
    os.replace(temporary, path)
    return path
