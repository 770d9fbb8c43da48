"""The words of the synthetic COCO world: one place for what its pictures contain and its captions say.

The synthetic caption generator draws scenes from these lists, and the tiny tokenizer is trained on sentences
built from them, so every caption word is a short token sequence for the tiny model.
"""

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
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
FILLER_WORDS = (
    "a", "an", "the", "of", "on", "in", "and", "with", "there", "is", "are", "picture", "image", "photo",
    "background", "corner", "shows", "showing", "drawn", "some", "shapes", "side", "near", "one",
)


def vocabulary_sentences() -> list[str]:
    """Sentences covering every word of the synthetic captions (tokenizer training text)."""
    sentences = [CAPTION_PROMPT, " ".join(FILLER_WORDS)]
    for shape in SHAPES:
        for color in COLORS:
            for count, word in COUNT_WORDS.items():
                noun = shape if count == 1 else PLURALS[shape]
                sentences.append(f"{word} {color} {noun} on a gray background.")
    for size in SIZES:
        for position in POSITIONS:
            for background in BACKGROUNDS:
                sentences.append(f"A {size} shape in the {position} of a {background} picture.")
    return sentences
