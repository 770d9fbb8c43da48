"""Meta file -> datasets -> collated batches -> the model, with the documented behaviour on bad input."""

import json
import logging
import random
import warnings

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from internvl_chat.data.collator import concat_pad_data_collator
from internvl_chat.data.dataset import build_datasets
from internvl_chat.data.formats import MetaError, load_meta
from internvl_chat.data.preprocess import IGNORE_INDEX, ConversationTokenizer, SampleError
from internvl_chat.data.samplers import ImageGroupedBatchSampler, LengthGroupedSampler, length_grouped_indices
from internvl_chat.devkit.checkpoint import tiny_config_dict
from internvl_chat.model.configuration_internvl_chat import InternVLChatConfig
from internvl_chat.model.modeling_internvl_chat import InternVLChatModel

PROMPT = "<image>\nProvide a one-sentence caption for the provided image."


def datasets_of(meta, conversation_tokenizer, **options):
    """build_datasets with the tutorial's tile limit unless a test sets another."""
    return build_datasets(meta, conversation_tokenizer, **{"max_dynamic_patch": 6, **options})


def line(image, caption, prompt=PROMPT):
    return json.dumps(
        {"image": image, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption}]}
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture
def coco(tmp_path):
    (tmp_path / "train2014").mkdir()
    for name, size, colour in [
        ("a.jpg", (640, 480), "red"),
        ("b.jpg", (480, 640), "blue"),
        ("c.jpg", (300, 300), "green"),
    ]:
        Image.new("RGB", size, colour).save(tmp_path / "train2014" / name)
    lines = [
        line("train2014/a.jpg", "a red picture."),
        line("train2014/a.jpg", "red everywhere."),
        line("train2014/b.jpg", "a blue picture."),
        line("train2014/c.jpg", "a small green square."),
        json.dumps({"conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello."}]}),
        json.dumps(
            {
                "image": ["train2014/a.jpg", "train2014/b.jpg"],
                "conversations": [
                    {"from": "human", "value": "Compare the images."},
                    {"from": "gpt", "value": "One is red, one is blue."},
                ],
            }
        ),
    ]
    annotation = tmp_path / "train.jsonl"
    annotation.write_text("\n".join(lines) + "\n")
    return tmp_path, annotation


def write_meta(folder, annotation, **entry):
    meta = folder / "meta.json"
    meta.write_text(
        json.dumps(
            {
                "synthetic": {
                    "root": str(folder),
                    "annotation": str(annotation),
                    "data_augment": False,
                    "repeat_time": 1,
                    **entry,
                }
            }
        )
    )
    return meta


def encoder(tokenizer, num_image_token=256):
    return ConversationTokenizer(tokenizer, "internlm2-chat", num_image_token, 4096)


def test_items(tokenizer, coco):
    folder, annotation = coco
    dataset = build_datasets(write_meta(folder, annotation), encoder(tokenizer), max_dynamic_patch=6)
    assert len(dataset) == 6
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    first = dataset[0]
    assert first["pixel_values"].shape == (7, 3, 448, 448)  # 640x480 -> 3x2 grid + thumbnail
    assert first["image_flags"].tolist() == [1] * 7
    assert int((first["input_ids"] == context).sum()) == 7 * 256
    supervised = first["input_ids"][first["labels"] != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "a red picture.<|im_end|>"
    assert dataset[3]["pixel_values"].shape[0] == 1  # 300x300: one tile, no thumbnail
    text_only = dataset[4]
    assert text_only["image_flags"].tolist() == [0] and text_only["pixel_values"].shape == (1, 3, 448, 448)
    assert int((text_only["input_ids"] == context).sum()) == 0
    two_images = dataset[5]  # max_num = 6 // 2 = 3 per image: 640x480 -> (1,1); 480x640 -> (1,2) + thumbnail
    assert two_images["pixel_values"].shape[0] == 1 + 3
    assert int((two_images["input_ids"] == context).sum()) == 4 * 256


def test_meta_options(tokenizer, coco):
    folder, annotation = coco
    meta = write_meta(folder, annotation, max_dynamic_patch=2, repeat_time=0.5)
    dataset = build_datasets(meta, encoder(tokenizer), max_dynamic_patch=6)
    assert len(dataset) == 3
    assert dataset[0]["pixel_values"].shape[0] == 1  # 640x480 with at most 2 tiles -> (1,1); 7 with 6
    assert dataset[2]["pixel_values"].shape[0] == 3  # 480x640 -> (1,2) + thumbnail
    assert len(datasets_of(write_meta(folder, annotation, repeat_time=2), encoder(tokenizer))) == 12


def test_bad_lines_are_skipped_and_reported_or_fatal_in_strict_mode(tokenizer, coco, caplog):
    """Lines bad on their face are screened out when the dataset is built, with one summary naming their line
    numbers; strict mode stops there. A line found bad only when loading (an image that does not decode) is
    skipped for the next one and reported once, however often it is drawn."""
    folder, annotation = coco
    lines = annotation.read_text().splitlines()
    lines.insert(1, "{this is not json")
    lines.insert(2, line("train2014/missing.jpg", "nothing."))
    lines.insert(3, json.dumps({"image": "train2014/a.jpg"}))
    annotation.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        dataset = datasets_of(write_meta(folder, annotation), encoder(tokenizer))
    assert len(dataset) == 6 and dataset.datasets[0].skipped == 3
    summaries = [record.getMessage() for record in caplog.records if "cannot be used" in record.getMessage()]
    assert len(summaries) == 1
    assert (
        f"{annotation}: 3 of 9 lines cannot be used: line 2 (not valid JSON: Expecting property name enclosed "
        "in double quotes), line 3 (image train2014/missing.jpg not found under"
    ) in summaries[0]
    assert "line 4 (not a JSON object with a 'conversations' list)" in summaries[0]
    with pytest.raises(SampleError, match=r"3 of 9 lines cannot be used: line 2 .*leave out --strict_data"):
        datasets_of(write_meta(folder, annotation), encoder(tokenizer), strict=True)

    (folder / "train2014" / "c.jpg").write_bytes(b"not a jpeg")  # present, but does not decode
    dataset = datasets_of(write_meta(folder, annotation), encoder(tokenizer))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # as three epochs would
            item = dataset[3]
    assert item["image_flags"].tolist() == [0]  # fell through to the next line, the text-only one
    reports = [record.getMessage() for record in caplog.records]
    assert len(reports) == 1 and f"{annotation}:7: cannot read image" in reports[0], reports
    assert dataset.datasets[0].skipped == 3 + 1


def test_meta_errors(tokenizer, coco, tmp_path):
    folder, annotation = coco
    with pytest.raises(MetaError, match="does not exist"):
        load_meta(tmp_path / "nowhere.json")
    meta = tmp_path / "bad.json"
    meta.write_text(json.dumps({"x": {"root": str(folder), "annotation": str(folder / "train.json")}}))
    with pytest.raises(MetaError, match="must be a .jsonl file"):
        load_meta(meta)
    meta.write_text(json.dumps({"x": {"root": str(folder), "annotation": str(folder / "gone.jsonl")}}))
    with pytest.raises(MetaError, match="gone.jsonl does not exist"):
        load_meta(meta)


def test_collated_batch_trains_the_model(tokenizer, coco):
    folder, annotation = coco
    torch.manual_seed(0)
    model = InternVLChatModel(InternVLChatConfig(**tiny_config_dict(vocab_size=len(tokenizer))))
    dataset = datasets_of(write_meta(folder, annotation), encoder(tokenizer, model.num_image_token))
    features = [dataset[0], dataset[3], dataset[4]]
    batch = concat_pad_data_collator(features)
    longest = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == (3, longest)
    assert batch["pixel_values"].shape[0] == 7 + 1 + 1 and batch["image_flags"].tolist() == [1] * 8 + [0]
    short = len(features[2]["input_ids"])
    assert (batch["input_ids"][2, short:] == 0).all() and (batch["labels"][2, short:] == IGNORE_INDEX).all()
    assert not batch["attention_mask"][2, short:].any() and batch["attention_mask"][2, :short].all()
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a token/feature count mismatch would warn and zero the loss
        loss = model(**batch).loss
    assert loss.item() > 0
    loss.backward()
    assert model.mlp1[1].weight.grad.abs().sum() > 0  # image features reached the loss


def test_loader_with_workers_is_deterministic(tokenizer, coco):
    folder, annotation = coco
    meta = write_meta(folder, annotation, data_augment=True)
    dataset = datasets_of(meta, encoder(tokenizer), seed=3)
    runs = []
    for workers in (0, 2):
        loader = DataLoader(dataset, batch_size=2, num_workers=workers, collate_fn=concat_pad_data_collator)
        runs.append([batch["pixel_values"] for batch in loader])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_length_grouped_sampler():
    lengths = [(i * 37) % 101 + 1 for i in range(64)]
    first = length_grouped_indices(lengths, batch_size=4, world_size=2, generator=torch.Generator().manual_seed(0))
    again = list(LengthGroupedSampler(4, 2, lengths, seed=0))
    assert first == again and sorted(first) == list(range(64))
    for start in range(0, 64, 8):  # each megabatch: 2 chunks of 4, longest first overall, balanced totals
        megabatch = first[start : start + 8]
        chunk_a, chunk_b = megabatch[:4], megabatch[4:]
        assert max(lengths[i] for i in megabatch) in (lengths[chunk_a[0]], lengths[chunk_b[0]])
        total_a, total_b = sum(lengths[i] for i in chunk_a), sum(lengths[i] for i in chunk_b)
        assert abs(total_a - total_b) <= max(lengths[i] for i in megabatch)
    sampler = LengthGroupedSampler(4, 2, lengths, seed=0)
    sampler.set_epoch(1)
    second_epoch = list(sampler)
    assert second_epoch != first and sorted(second_epoch) == list(range(64))
    sampler.set_epoch(0)
    assert list(sampler) == first  # the epoch's order from the seed and the epoch alone


def test_image_groups_keep_each_pictures_captions_together(tokenizer, coco):
    folder, annotation = coco
    dataset = datasets_of(write_meta(folder, annotation), encoder(tokenizer)).datasets[0]
    groups = dataset.image_groups()
    assert [0, 1] in groups  # both captions of a.jpg


@pytest.mark.parametrize("budget, micro_batches, world", [(64, 4, 8), (8, 1, 2), (16, 1, 1)])
def test_grouped_steps_hold_the_tutorials_captions(budget, micro_batches, world):
    """Steps of whole pictures with, on average, the tutorial's captions a step (per-device batch x accumulation on
    each rank), each within one picture of it; the tutorial's number of whole steps, or one fewer; micro-batches of
    whole pictures dealt out to the ranks in accelerate's order (batch i to rank i mod world); every picture at
    most once an epoch, in a new order each epoch."""
    rng = random.Random(budget)
    sizes = [rng.choice([5] * 90 + [6] * 8 + [7] * 2) for _ in range(2000)]  # COCO: about 5 captions a picture
    starts = [sum(sizes[:index]) for index in range(len(sizes))]
    groups = [list(range(start, start + size)) for start, size in zip(starts, sizes)]
    sampler = ImageGroupedBatchSampler(groups, budget, micro_batches, world, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == sampler.steps * micro_batches * world
    tutorial_steps = sum(sizes) // (budget * world)
    assert tutorial_steps - 1 <= sampler.steps <= tutorial_steps
    per_step = [
        sum(len(batch) for batch in batches[step * micro_batches * world : (step + 1) * micro_batches * world])
        for step in range(sampler.steps)
    ]
    assert abs(sum(per_step) / len(per_step) - budget * world) <= 0.03 * budget * world
    picture_of = {index: number for number, group in enumerate(groups) for index in group}
    seen = set()
    for batch in batches:
        pictures = {picture_of[index] for index in batch}
        in_order = sorted(pictures, key=lambda picture: batch.index(groups[picture][0]))
        assert batch == [index for picture in in_order for index in groups[picture]]
        assert not pictures & seen  # each picture once, whole
        seen |= pictures
    for rank in range(world):  # every rank's steps: the budget within a picture, on average
        mine = [
            sum(len(batches[(step * micro_batches + micro) * world + rank]) for micro in range(micro_batches))
            for step in range(sampler.steps)
        ]
        assert abs(sum(mine) / len(mine) - budget) <= 0.05 * budget
    orders = set()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.add(tuple(map(tuple, sampler)))
    assert len(orders) == 3  # reshuffled per epoch


def test_length_grouped_sampler_keeps_whole_optimizer_steps():
    lengths = list(range(1, 71))  # 70 samples, megabatch 4 x 4 = 16: 4 whole steps, 6 left over
    sampler = LengthGroupedSampler(4, 4, lengths, seed=1)
    indices = list(sampler)
    assert len(sampler) == len(indices) == 64 and len(set(indices)) == 64
    everything = LengthGroupedSampler(4, 4, lengths, seed=1, whole_steps=False)
    all_indices = list(everything)
    assert len(all_indices) == 70 and all_indices[:64] == indices


@pytest.mark.parametrize("augment", [False, True])
def test_grouped_loading_opens_each_picture_once_and_gives_the_same_batches(tokenizer, coco, monkeypatch, augment):
    """ImageGroupedDataset (the grouped mode's loader): the same collated batches as item-by-item loading, with
    each picture of a batch opened once instead of once per caption; a picture that cannot be opened falls back
    to item-by-item loading, which skips it as before."""
    from internvl_chat.data import dataset as dataset_module
    from internvl_chat.data.collator import image_grouped_collator
    from internvl_chat.data.dataset import ImageGroupedDataset, image_groups

    folder, annotation = coco
    lines = annotation.read_text().splitlines()
    lines += [
        line("train2014/broken.jpg", "nothing."),
        line("train2014/broken.jpg", "nothing at all."),
        line("train2014/b.jpg", "blue again."),
    ]
    annotation.write_text("\n".join(lines) + "\n")
    (folder / "train2014" / "broken.jpg").write_bytes(b"not a jpeg")  # present, but does not decode
    dataset = datasets_of(write_meta(folder, annotation, data_augment=augment), encoder(tokenizer))
    opened = []
    real_open = dataset_module.open_image
    monkeypatch.setattr(dataset_module, "open_image", lambda path: opened.append(path.name) or real_open(path))

    def batches(source):
        opened.clear()
        groups = image_groups(dataset)  # every picture, in two batches of whole pictures
        sampler = [[index for group in half for index in group] for half in (groups[:3], groups[3:])]
        loader = DataLoader(source, batch_sampler=sampler, collate_fn=image_grouped_collator)
        return list(loader), list(opened)

    plain, plain_opened = batches(dataset)
    once, once_opened = batches(ImageGroupedDataset(dataset))
    assert len(plain) == len(once) == 2
    for a, b in zip(plain, once):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    # Item by item: a.jpg for its 2 captions and the pair; b.jpg for its 2 captions, the pair and the 2 captions of
    # broken.jpg, each skipped to the next line (7, then 8) until b.jpg's second caption.
    counts = {name: plain_opened.count(name) for name in set(plain_opened)}
    assert counts == {"a.jpg": 3, "b.jpg": 5, "c.jpg": 1, "broken.jpg": 3}
    # Once per picture: a.jpg and b.jpg once less; broken.jpg one try more (the group's own) before the fallback.
    counts = {name: once_opened.count(name) for name in set(once_opened)}
    assert counts == {"a.jpg": 2, "b.jpg": 4, "c.jpg": 1, "broken.jpg": 4}
