"""The internvl2_5 template's preprocessing (InternVL2.5, 3 and 3.5), against its rules in the original's
preprocess_internvl2_5: each turn tokenised on its own from the literal strings below, BOS once at the start where
the tokenizer adds one (InternLM2.5) and none for Qwen2.5, the system message and the questions unsupervised, in an
answer its `<|im_start|>assistant\\n` header and the newline after its `<|im_end|>` unsupervised, values as written,
`<image>` expanded in human turns only. Both tokenizer kinds: the InternLM2-style sentencepiece one (BOS) and the
Qwen2.5-style byte BPE one (no BOS)."""

import json

import pytest

from internvl_chat.data.formats import conversation_rules, read_line
from internvl_chat.data.preprocess import IGNORE_INDEX, ConversationTokenizer, SampleError
from internvl_chat.model.conversation import INTERNVL2_5_SYSTEM_MESSAGE

PROMPT = "Provide a one-sentence caption for the provided image."
TOKENS_PER_TILE = 4
RULES = conversation_rules("internvl2_5")


@pytest.fixture(scope="module", params=["internlm2", "qwen2"])
def tokenizer(request, tiny_tokenizer, tiny_qwen2_tokenizer):
    return tiny_tokenizer if request.param == "internlm2" else tiny_qwen2_tokenizer


def adds_bos(tokenizer) -> bool:
    return bool(tokenizer("")["input_ids"])


def expected(tokenizer, system, turns, tiles):
    """The original's ids and labels, written out: the pieces as its f-strings build them, images fully expanded
    in the human turns, every piece tokenised alone (its BOS, if any, dropped; one BOS in front of all)."""
    pieces = [("system", f"<|im_start|>system\n{system}<|im_end|>\n")]
    images = iter(tiles)
    for role, value in turns:
        if role == "human":
            while "<image>" in value:
                value = value.replace(
                    "<image>", "<img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * next(images)) + "</img>", 1
                )
            pieces.append((role, f"<|im_start|>user\n{value}<|im_end|>\n"))
        else:
            pieces.append((role, f"<|im_start|>assistant\n{value}<|im_end|>\n"))
    bos = adds_bos(tokenizer)
    header = len(tokenizer("<|im_start|>assistant\n")["input_ids"]) - (1 if bos else 0)
    ids, labels = ([tokenizer.bos_token_id], [IGNORE_INDEX]) if bos else ([], [])
    for role, piece in pieces:
        piece_ids = tokenizer(piece)["input_ids"][1 if bos else 0 :]
        ids += piece_ids
        if role == "gpt":
            labels += [IGNORE_INDEX] * header + piece_ids[header:-1] + [IGNORE_INDEX]
        else:
            labels += [IGNORE_INDEX] * len(piece_ids)
    return ids, labels


def supervised_text(tokenizer, sample) -> list[str]:
    """The decoded supervised runs, in order."""
    runs, current = [], []
    for token, label in zip(sample.input_ids.tolist(), sample.labels.tolist(), strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def encode(tokenizer, conversations, tiles, max_len=8192):
    return ConversationTokenizer(tokenizer, "internvl2_5", TOKENS_PER_TILE, max_len)(conversations, tiles)


def test_a_caption_is_its_answer_and_im_end_supervised(tokenizer):
    caption = "Two red circles on a gray background."
    sample = encode(
        tokenizer, [{"from": "human", "value": f"<image>\n{PROMPT}"}, {"from": "gpt", "value": caption}], [3]
    )
    ids, labels = expected(
        tokenizer, INTERNVL2_5_SYSTEM_MESSAGE, [("human", f"<image>\n{PROMPT}"), ("gpt", caption)], [3]
    )
    assert sample.input_ids.tolist() == ids
    assert sample.labels.tolist() == labels
    assert supervised_text(tokenizer, sample) == [caption + "<|im_end|>"]
    assert sample.input_ids.tolist().count(tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")) == 3 * TOKENS_PER_TILE
    # one BOS, in front, for InternLM2.5's tokenizer; Qwen2.5's has none
    bos_positions = [i for i, token in enumerate(sample.input_ids.tolist()) if token == tokenizer.bos_token_id]
    assert bos_positions == ([0] if adds_bos(tokenizer) else [])
    assert adds_bos(tokenizer) == (tokenizer.bos_token_id is not None)
    # the newline after the answer's <|im_end|> closes the sequence and is not supervised
    assert tokenizer.decode(sample.input_ids[-2:].tolist()) == "<|im_end|>\n"
    assert sample.labels[-1].item() == IGNORE_INDEX and sample.labels[-2].item() != IGNORE_INDEX
    assert not sample.mismatch


def test_a_system_turn_in_the_data_is_the_system_message_verbatim(tokenizer):
    system = "  Answer in one short sentence.\n"
    conversations = [
        {"from": "system", "value": system},
        {"from": "human", "value": f"<image>\n{PROMPT}"},
        {"from": "gpt", "value": "A star."},
    ]
    sample = encode(tokenizer, conversations, [1])
    ids, labels = expected(tokenizer, system, [("human", f"<image>\n{PROMPT}"), ("gpt", "A star.")], [1])
    assert (sample.input_ids.tolist(), sample.labels.tolist()) == (ids, labels)
    text = tokenizer.decode(sample.input_ids.tolist())
    assert f"<|im_start|>system\n{system}<|im_end|>\n" in text and INTERNVL2_5_SYSTEM_MESSAGE not in text


def test_values_are_kept_as_written_and_an_empty_answer_trains_on_im_end(tokenizer):
    turns = [
        {"from": "human", "value": " <image>\nWhat is this? "},
        {"from": "gpt", "value": ""},
        {"from": "human", "value": "And the colour?"},
        {"from": "gpt", "value": " Red. "},
    ]
    sample = encode(tokenizer, turns, [2])
    ids, labels = expected(
        tokenizer,
        INTERNVL2_5_SYSTEM_MESSAGE,
        [("human", " <image>\nWhat is this? "), ("gpt", ""), ("human", "And the colour?"), ("gpt", " Red. ")],
        [2],
    )
    assert (sample.input_ids.tolist(), sample.labels.tolist()) == (ids, labels)
    assert supervised_text(tokenizer, sample) == ["<|im_end|>", " Red. <|im_end|>"]


def test_two_images_in_two_questions_and_an_image_placeholder_in_an_answer_is_text(tokenizer):
    turns = [
        ("human", "Image-1: <image>\nDescribe it."),
        ("gpt", "It shows <image> tags."),
        ("human", "Image-2: <image>\nAnd this one?"),
        ("gpt", "A square."),
    ]
    sample = encode(tokenizer, [{"from": role, "value": value} for role, value in turns], [2, 1])
    ids, labels = expected(tokenizer, INTERNVL2_5_SYSTEM_MESSAGE, turns, [2, 1])
    assert (sample.input_ids.tolist(), sample.labels.tolist()) == (ids, labels)
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert sample.input_ids.tolist().count(context) == 3 * TOKENS_PER_TILE
    assert supervised_text(tokenizer, sample) == ["It shows <image> tags.<|im_end|>", "A square.<|im_end|>"]
    with pytest.raises(SampleError, match="2 <image> placeholders for 3 images"):
        encode(tokenizer, [{"from": role, "value": value} for role, value in turns], [2, 1, 1])


def test_right_truncation_of_text_and_refusal_to_cut_an_image(tokenizer):
    long_answer = "a red circle " * 40
    conversations = [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": long_answer}]
    full = encode(tokenizer, conversations, [])
    cut = encode(tokenizer, conversations, [], max_len=len(full.input_ids) - 7)
    assert cut.input_ids.tolist() == full.input_ids.tolist()[:-7]
    assert cut.labels.tolist() == full.labels.tolist()[:-7]
    with_image = [{"from": "human", "value": f"<image>\n{PROMPT}"}, {"from": "gpt", "value": "A star."}]
    with pytest.raises(SampleError, match="without cutting image tokens"):
        encode(tokenizer, with_image, [4], max_len=20)


def test_the_verdict_on_a_line_under_the_internvl2_5_rules(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    line = {
        "image": "a.jpg",
        "conversations": [
            {"from": "system", "value": " Be brief. "},
            {"from": "human", "value": "<image>\nWhat is it? "},
            {"from": "gpt", "value": ""},
        ],
    }
    verdict = read_line(json.dumps(line), tmp_path, rules=RULES)
    assert verdict.system == " Be brief. "
    assert verdict.turns == (("human", "<image>\nWhat is it? "), ("gpt", ""))
    # InternVL2's rules drop the system turn, strip, and cannot train on an empty answer
    assert read_line(json.dumps(line), tmp_path).startswith("an answer (gpt turn) is empty")
    # a placeholder in an answer is text under internvl2_5, a picture under InternVL2's templates
    line["conversations"][1:] = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "An <image>."}]
    assert read_line(json.dumps(line), tmp_path, rules=RULES).turns[1] == ("gpt", "An <image>.")
    assert RULES.placeholders(read_line(json.dumps(line), tmp_path, rules=RULES).turns) == 0
    assert conversation_rules("internlm2-chat").placeholders(read_line(json.dumps(line), tmp_path).turns) == 1
    line["conversations"][1]["value"] = "<image> and <image>?"
    assert "in the human turns" in read_line(json.dumps(line), tmp_path, rules=RULES)
    line["conversations"][0]["from"] = "gpt"
    assert "a system turn before it" in read_line(json.dumps(line), tmp_path, rules=RULES)


def test_only_internlm2_chat_strips_values_among_the_internvl2_templates(tmp_path):
    """The original's preprocess_internlm strips each value; preprocess_mpt (Hermes-2) and preprocess_phi3 do not."""
    line = {"conversations": [{"from": "human", "value": " What? "}, {"from": "gpt", "value": " A star.\n"}]}
    for template, question in (("internlm2-chat", "What?"), ("Hermes-2", " What? "), ("phi3-chat", " What? ")):
        verdict = read_line(json.dumps(line), tmp_path, rules=conversation_rules(template))
        assert verdict.turns[0] == ("human", question), template


def test_the_validator_reads_data_with_the_template_it_is_told(tmp_path, capsys):
    from PIL import Image

    from internvl_chat.cli.validate_data import main

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.jpg")
    line = {"image": "a.jpg", "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": ""}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(line) + "\n")
    meta = tmp_path / "meta.json"
    meta.write_text(
        json.dumps({"d": {"root": str(tmp_path), "annotation": str(tmp_path / "train.jsonl"), "length": 1}})
    )
    assert main(["--meta", str(meta), "--quiet"]) == 1
    assert "an answer (gpt turn) is empty" in capsys.readouterr().out
    assert main(["--meta", str(meta), "--quiet", "--conv-style", "internvl2_5"]) == 0
