"""The words of the synthetic COCO world: one place for what its pictures contain and its captions say.

The synthetic caption generator draws scenes from these lists, and the tiny tokenizer is trained on sentences
built from them, so every caption word is a short token sequence for the tiny model.
"""

from ..data.formats import CAPTION_PROMPT  # the evaluation prompt, also used by the train lines

# name -> RGB; far enough apart that a frozen random ViT still separates them.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
BACKGROUNDS = {"gray": (128, 128, 128), "white": (245, 245, 245), "black": (15, 15, 15), "brown": (120, 80, 40)}
SHAPES = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
FILLER_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "and",
    "with",
    "there",
    "is",
    "are",
    "picture",
    "image",
    "photo",
    "background",
    "corner",
    "shows",
    "showing",
    "drawn",
    "some",
    "shapes",
    "side",
    "near",
    "one",
    "plain",
    "many",
    "colorful",
)
# How a caption names a position: corners are "the top left corner", the middle is "the center".
POSITION_PHRASES = {position: position if position == "center" else f"{position} corner" for position in POSITIONS}

# Caption templates of the synthetic COCO (internvl_chat/devkit/coco.py fills them in).
# {things}: every group of shapes, e.g. "two red circles and a blue square"; {sized_things} the same with the size
# of single shapes ("a large blue square"); {be}: "is" or "are" to agree with the first group;
# {background}: the background colour. Kept short (about 8-14 words) so a generated caption fits the
# evaluation's 30 new tokens.
LIST_TEMPLATES = (
    "{things} on a {background} background.",
    "a {background} picture with {sized_things}.",
    "there {be} {things} on a {background} background.",
    "an image of {sized_things} on a {background} background.",
    "a {background} photo of {things}.",
)
# Only for one group ({thing}, {where}) or two groups ({thing1}, {where1}, {thing2}, {where2});
# {where} is a POSITION_PHRASES value.
ONE_GROUP_TEMPLATES = (
    "a {background} picture with {thing} in the {where}.",
    "{sized_thing} in the {where} of a {background} image.",
)
TWO_GROUP_TEMPLATES = ("{thing1} in the {where1} and {thing2} in the {where2}.",)
# For busy pictures (three or more groups), a COCO-like summary that is still predictable from the picture.
BUSY_TEMPLATES = ("many colorful shapes on a {background} background.",)

# How the tiny *base* model learns to talk before any caption fine-tuning (tools/make_tiny_model.py
# --pretrain-steps): longer, chattier answers that are not tied to any picture. The real InternVL2 likewise
# writes longer captions in another style than COCO's references; fine-tuning teaches the style and grounding.
BASE_MODEL_TEMPLATES = (
    "The image shows {things} drawn on a plain {background} background, with nothing else in the picture.",
    "In this picture there are {things}, and the rest of the image is {background}.",
    "This is a simple image of {things} on a {background} background.",
)


def base_model_sentences(count: int, seed: int = 0) -> list[str]:
    """Random descriptions in the base-model style (they describe no particular picture)."""
    import random

    rng = random.Random(f"base-model:{seed}")
    sentences = []
    for _ in range(count):
        groups = []
        for _ in range(rng.randint(1, 3)):
            number, shape = rng.choice(list(COUNT_WORDS)), rng.choice(SHAPES)
            groups.append(
                f"{COUNT_WORDS[number]} {rng.choice(list(COLORS))} {shape if number == 1 else PLURALS[shape]}"
            )
        things = groups[0] if len(groups) == 1 else ", ".join(groups[:-1]) + " and " + groups[-1]
        template = rng.choice(BASE_MODEL_TEMPLATES)
        sentences.append(template.format(things=things, background=rng.choice(list(BACKGROUNDS))))
    return sentences


def vocabulary_sentences() -> list[str]:
    """Sentences covering every word of the synthetic captions (tokenizer training text)."""
    sentences = [CAPTION_PROMPT, " ".join(FILLER_WORDS), *base_model_sentences(60)]
    for shape in SHAPES:
        for color in COLORS:
            for count, word in COUNT_WORDS.items():
                noun = shape if count == 1 else PLURALS[shape]
                sentences.append(f"{word} {color} {noun} on a gray background.")
    for size in SIZES:
        for position in POSITIONS:
            for background in BACKGROUNDS:
                sentences.append(f"A {size} shape in the {position} of a {background} picture.")
    # One rendering of every caption template per background, so the tokenizer sees whole captions as they are
    # written (commas, "is"/"are", the position phrases).
    colors, shapes = list(COLORS), list(SHAPES)
    for index, background in enumerate(BACKGROUNDS):
        color1, color2 = colors[index % len(colors)], colors[(index + 3) % len(colors)]
        shape1, shape2 = shapes[index % len(shapes)], shapes[(index + 1) % len(shapes)]
        size = SIZES[index % len(SIZES)]
        thing1, thing2 = f"a {color1} {shape1}", f"two {color2} {PLURALS[shape2]}"
        things = f"{thing1}, {thing2} and three {color2} {PLURALS[shape1]}"
        where1 = POSITION_PHRASES[POSITIONS[index % len(POSITIONS)]]
        where2 = POSITION_PHRASES[POSITIONS[(index + 2) % len(POSITIONS)]]
        sized_things = f"a {size} {color1} {shape1} and {thing2}"
        fields = dict(
            background=background,
            things=things,
            sized_things=sized_things,
            be="is",
            thing=thing1,
            sized_thing=f"a {size} {color1} {shape1}",
            where=where1,
            thing1=thing1,
            where1=where1,
            thing2=thing2,
            where2=where2,
        )
        for template in LIST_TEMPLATES + ONE_GROUP_TEMPLATES + TWO_GROUP_TEMPLATES + BUSY_TEMPLATES:
            sentences.append(template.format(**fields))
        sentences.append(f"there are {thing2} on a plain {background} background.")
    return sentences
