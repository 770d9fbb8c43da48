"""Template rendering, tokenization and the label mask, position by position, and against a restatement of
the original counting on fully expanded strings."""

import pytest
import torch

from internvl_chat.data.preprocess import IGNORE_INDEX, ConversationTokenizer, SampleError
from internvl_chat.model.conversation import get_conv_template

PROMPT = "Provide a one-sentence caption for the provided image."
TOKENS_PER_TILE = 4  # small, so the restated original (which tokenizes every <IMG_CONTEXT>) stays fast


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def caption_sample(caption="Two red circles on a gray background. "):
    return [{"from": "human", "value": f"<image>\n{PROMPT}"}, {"from": "gpt", "value": caption}]


def original_preprocess_internlm(tokenizer, conversations, tiles, max_len=4096):
    """FORMAT.md §4.3 step by step, on the fully expanded string."""
    template = get_conv_template("internlm2-chat")
    for i, turn in enumerate(conversations):
        template.append_message(template.roles[i % 2], turn["value"].strip())
    text = template.get_prompt()
    for n in tiles:
        text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * n) + "</img>", 1)
    ids = tokenizer(text, max_length=max_len, truncation=True)["input_ids"]
    labels = list(ids)
    total = sum(1 for t in ids if t != tokenizer.pad_token_id)
    cur = 1
    labels[0] = IGNORE_INDEX
    parts = text.split(template.roles[1])
    n = len(tokenizer(parts[0] + template.roles[1])["input_ids"]) - 1
    labels[cur : cur + n] = [IGNORE_INDEX] * n
    cur += n
    for part in parts[1:-1]:
        answer, user = part.split(template.roles[0])
        cur += len(tokenizer(answer)["input_ids"]) - 1
        n = len(tokenizer(template.roles[0] + user + template.roles[1])["input_ids"]) - 1
        labels[cur : cur + n] = [IGNORE_INDEX] * n
        cur += n
    cur += len(tokenizer(parts[-1])["input_ids"]) - 1
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    if cur < max_len and cur != total:
        labels = [IGNORE_INDEX] * len(labels)
    return ids, labels


def test_position_by_position(tokenizer):
    encode = ConversationTokenizer(tokenizer, "internlm2-chat", TOKENS_PER_TILE, 4096)
    sample = encode(caption_sample(), [3])
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    tid = tokenizer.convert_tokens_to_ids
    system_and_user = tokenizer(
        "<|im_start|>system\n" + get_conv_template("internlm2-chat").system_message + "<|im_end|><|im_start|>user\n"
    )["input_ids"]
    assert ids[: len(system_and_user)] == system_and_user  # BOS + system turn + user header
    start = ids.index(tid("<img>"))
    assert start == len(system_and_user)
    assert ids[start + 1 : start + 1 + 3 * TOKENS_PER_TILE] == [tid("<IMG_CONTEXT>")] * (3 * TOKENS_PER_TILE)
    end = start + 1 + 3 * TOKENS_PER_TILE
    assert ids[end] == tid("</img>")
    answer_start = ids.index(tid("<|im_start|>"), end) + len(tokenizer("assistant\n")["input_ids"])
    assert ids[answer_start - 1] != tid("<|im_end|>")
    # everything before the answer is masked, the answer and its <|im_end|> are supervised, nothing after
    assert all(label == IGNORE_INDEX for label in labels[:answer_start])
    assert labels[answer_start:] == ids[answer_start:]
    assert ids[-1] == tid("<|im_end|>")
    assert tokenizer.decode(ids[answer_start:-1]) == "Two red circles on a gray background."  # stripped
    assert sample.attention_mask.all() and sample.position_ids.tolist() == list(range(len(ids)))


@pytest.mark.parametrize(
    "conversations, tiles",
    [
        (caption_sample(), [7]),
        (caption_sample("A small green star in the top left corner of a white picture."), [1]),
        (
            [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": "A red square."},
                {"from": "human", "value": "And its colour?"},
                {"from": "gpt", "value": "Red."},
                {"from": "human", "value": "Where is it?"},
                {"from": "gpt", "value": "In the center."},
            ],
            [5],
        ),
        ([{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there."}], []),
    ],
)
def test_equals_the_original_counting(tokenizer, conversations, tiles):
    encode = ConversationTokenizer(tokenizer, "internlm2-chat", TOKENS_PER_TILE, 4096)
    sample = encode(conversations, tiles)
    ids, labels = original_preprocess_internlm(tokenizer, conversations, tiles)
    assert sample.input_ids.tolist() == ids
    assert sample.labels.tolist() == labels
    assert not sample.mismatch
    supervised = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    answers = [t["value"].strip() for t in conversations if t["from"] == "gpt"]
    assert tokenizer.decode(supervised) == "<|im_end|>".join(answers) + "<|im_end|>"


def test_a_leading_assistant_turn_is_dropped(tokenizer):
    encode = ConversationTokenizer(tokenizer, "internlm2-chat", TOKENS_PER_TILE, 4096)
    with_leading = [{"from": "gpt", "value": "ignored"}] + caption_sample()
    assert torch.equal(encode(with_leading, [1]).input_ids, encode(caption_sample(), [1]).input_ids)


@pytest.mark.parametrize(
    "conversations, message",
    [
        ([{"from": "human", "value": "<image>\nx"}, {"from": "human", "value": "y"}], "alternate"),
        (caption_sample(caption="   "), "empty"),
        ([], "no human turn"),
    ],
)
def test_bad_conversations(tokenizer, conversations, message):
    encode = ConversationTokenizer(tokenizer, "internlm2-chat", TOKENS_PER_TILE, 4096)
    with pytest.raises(SampleError, match=message):
        encode(conversations, [1])


def test_too_long_never_cuts_image_tokens(tokenizer):
    encode = ConversationTokenizer(tokenizer, "internlm2-chat", 256, 1000)
    with pytest.raises(SampleError, match="do not fit max_seq_length 1000"):
        encode(caption_sample(), [7])  # 1792 image tokens


def test_text_overflow_is_truncated_on_the_right(tokenizer):
    full = ConversationTokenizer(tokenizer, "internlm2-chat", TOKENS_PER_TILE, 4096)(caption_sample(), [1])
    limit = len(full.input_ids) - 3
    cut = ConversationTokenizer(tokenizer, "internlm2-chat", TOKENS_PER_TILE, limit)(caption_sample(), [1])
    assert torch.equal(cut.input_ids, full.input_ids[:limit])
    assert torch.equal(cut.labels, full.labels[:limit])
