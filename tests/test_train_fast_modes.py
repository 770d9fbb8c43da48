"""The fast training modes give the original's loss and LoRA gradients (fp32, CPU, tiny model), through the same
BatchLayout the trainer and the benchmark use."""

import copy

import pytest
import torch

from internvl_chat.data.collator import (
    GROUPED_LENGTH_MULTIPLE,
    batch_counts,
    concat_pad_data_collator,
    image_grouped_collator,
)
from internvl_chat.data.preprocess import IGNORE_INDEX
from internvl_chat.model.decoder_steps import ROWS_MASK_KEY_MULTIPLE
from internvl_chat.train import attention as attention_module
from internvl_chat.train.attention import PREFIX_SPLIT_ATTENTION, causal_head_length
from internvl_chat.train.batch_layout import BatchLayout, positions_through_padding
from internvl_chat.train.model_setup import compile_blocks
from internvl_chat.train.step import caption_weights, micro_batch_loss, run_step, weigh_step
from internvl_chat.train.step_shape import decide_step_shape

PER_CAPTION = BatchLayout(supervised_logits_only=True)


def loss_and_grads(model, inputs):
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def layout_inputs(layout: BatchLayout, items: list[dict], device=None) -> dict:
    """What the trainer hands the model: the layout's collator (loader worker), then model_inputs on the device."""
    batch = layout.collator()(items)
    if device is not None:
        batch = batch.to(device)
    return layout.model_inputs(batch)


def assert_same(reference, other, loss_rtol=1e-6, rtol=1e-4, atol=1e-8):
    (loss, grads), (other_loss, other_grads) = reference, other
    assert torch.allclose(other_loss, loss, rtol=loss_rtol)
    assert grads.keys() == other_grads.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(other_grads[name], grad, rtol=rtol, atol=atol), name


def with_llm_attention(model, attention: str):
    """The model's LLM switched to `attention` through transformers' public set_attn_implementation."""
    model.set_attn_implementation({"llm_config": attention})
    return model


@pytest.fixture
def model(lora_model):
    return with_llm_attention(lora_model, "sdpa")


def grouped_items(dataset, captions=3, pictures=2, first=0) -> list[dict]:
    groups = dataset.datasets[0].image_groups()
    return [dataset[i] for group in groups[first : first + pictures] for i in group[:captions]]


FAMILIES = ["internlm2", "qwen2", "phi3", "llama", "qwen3"]
# the LoRA targets a decoder layer has, per family (LLM_LORA_TARGETS), and the module whose input is the MLP's middle
LORA_TARGETS_A_LAYER = {"internlm2": 5, "qwen2": 7, "phi3": 4, "llama": 7, "qwen3": 7}
DOWN_PROJECTION = {"internlm2": "feed_forward.w2", "qwen2": "mlp.down_proj", "phi3": "mlp.down_proj",
                   "llama": "mlp.down_proj", "qwen3": "mlp.down_proj"}  # fmt: skip


def family_model(make_lora_model, family: str, attention: str = "sdpa"):
    return with_llm_attention(make_lora_model(family), attention)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_supervised_logits_only_matches_the_full_logits(make_lora_model, training_items, family, attention):
    """The loss and every LoRA gradient of the supervised rows' path (the last layer at those rows only) equal the
    full logits' on each LLM family of the seven sizes: InternLM2's own output rows, transformers' Qwen2, Phi-3 and
    Llama through their decoder steps."""
    model = family_model(make_lora_model, family, attention)
    assert model.decoder_steps.supports_output_rows and PER_CAPTION.computes_last_layer_at_rows(model)
    faithful = loss_and_grads(model, concat_pad_data_collator(training_items))
    fast = loss_and_grads(model, layout_inputs(PER_CAPTION, training_items))
    assert len(fast[1]) == 2 * LORA_TARGETS_A_LAYER[family] * 2  # A and B of each LoRA target in both layers
    assert_same(faithful, fast)


@pytest.mark.parametrize("family", ["qwen2", "phi3", "llama", "qwen3"])
def test_grouped_supervised_rows_match_the_full_logits(make_lora_model, training_dataset, family):
    """Grouped by image (each caption sees the prompt and itself under a [B, 1, L, L] mask), the rows' path of
    transformers' families gives the full logits' loss and gradients too."""
    model = family_model(make_lora_model, family)
    items = grouped_items(training_dataset)
    full = BatchLayout(group_by_image=True, requested_attention="sdpa")
    rows = BatchLayout(group_by_image=True, supervised_logits_only=True, requested_attention="sdpa")
    assert_same(loss_and_grads(model, layout_inputs(full, items)), loss_and_grads(model, layout_inputs(rows, items)))


@pytest.mark.parametrize("family", FAMILIES)
def test_supervised_logits_compute_the_last_layer_at_the_supervised_rows_only(make_lora_model, training_items, family):
    """Nothing reads the last decoder layer's other rows: its attention output, MLP and the LM head run at the
    supervised positions only (R slots a sequence, the most of any sequence), the other layers at every row."""
    model = family_model(make_lora_model, family)
    layers = model.language_model.get_base_model().model.layers
    rows_seen = []
    hooks = [
        layer.get_submodule(DOWN_PROJECTION[family]).register_forward_hook(
            lambda module, args, out: rows_seen.append(args[0].shape[1])
        )
        for layer in layers
    ]
    batch = concat_pad_data_collator(training_items)
    try:
        output = model(**layout_inputs(PER_CAPTION, training_items))
    finally:
        for hook in hooks:
            hook.remove()
    slots = int((batch["labels"][:, 1:] != -100).sum(dim=1).max())
    length = batch["input_ids"].shape[1]
    assert rows_seen == [length] * (len(layers) - 1) + [slots] and slots < length
    assert output.logits.shape == (len(training_items), slots, model.config.llm_config.vocab_size)


@pytest.mark.parametrize("family", ["qwen2", "phi3", "llama"])
def test_the_rows_path_under_gradient_checkpointing(make_lora_model, training_items, family):
    """Under gradient checkpointing (the faithful mode's), the last layer at the rows is recomputed too: the loss
    and gradients stay."""
    model = family_model(make_lora_model, family)
    inputs = layout_inputs(PER_CAPTION, training_items)
    reference = loss_and_grads(model, inputs)
    checkpointed = copy.deepcopy(model).train()
    checkpointed.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.language_model.get_base_model().model.layers[-1].gradient_checkpointing
    assert_same(reference, loss_and_grads(checkpointed, inputs))


@pytest.mark.torch_compile
def test_the_rows_path_with_compiled_blocks(make_lora_model, training_items):
    """With compiled blocks (Phi-3's fused projections here), the rows' path keeps the loss and gradients."""
    model = family_model(make_lora_model, "phi3")
    inputs = layout_inputs(PER_CAPTION, training_items)
    reference = loss_and_grads(model, inputs)
    compiled = copy.deepcopy(model)
    compile_blocks(compiled)
    assert_same(reference, loss_and_grads(compiled, inputs), loss_rtol=1e-5, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_right_padding_needs_no_mask(model, training_items, attention):
    """The training collator drops the right-padding mask (causal attention never lets a real token see a pad on
    its right) and continues the pads' positions: the loss and gradients of the padded batch with its mask."""
    with_llm_attention(model, attention)
    padded = concat_pad_data_collator(training_items)
    assert not padded["attention_mask"].all()  # the batch really is padded
    collated = BatchLayout().collator()(training_items)
    assert collated.attention_mask is None and collated.position_ids is None
    assert_same(loss_and_grads(model, padded), loss_and_grads(model, BatchLayout().model_inputs(collated)))


@pytest.mark.torch_compile
def test_compiled_blocks_give_the_same_loss_and_gradients(model, training_items):
    inputs = layout_inputs(PER_CAPTION, training_items)
    reference = loss_and_grads(model, inputs)
    compiled = copy.deepcopy(model)
    assert compile_blocks(compiled) == 2 + 2  # the tiny model's ViT layers and decoder layers
    assert_same(reference, loss_and_grads(compiled, inputs), loss_rtol=1e-5, rtol=1e-3, atol=1e-6)
    assert sorted(compiled.state_dict()) == sorted(model.state_dict())  # checkpoints keep their keys


def test_each_compiled_stack_is_one_graph(model, training_dataset):
    """All decoder layers of a step but the last run one compiled graph, and so do all ViT layers; the last
    decoder layer, which computes the supervised rows only, is the third graph. Another graph costs another
    compile of forward and backward (tens of seconds for a 2B model on a GPU) and, when its case first appears
    mid-run, a stall; so batches of other lengths and other numbers of supervised rows add none."""
    from torch._dynamo.utils import counters

    grouped = BatchLayout(group_by_image=True, supervised_logits_only=True, requested_attention="sdpa")
    batch = layout_inputs(grouped, grouped_items(training_dataset, captions=3))
    other = layout_inputs(grouped, grouped_items(training_dataset, captions=2, first=1))
    assert other["input_ids"].shape != batch["input_ids"].shape
    compiled = copy.deepcopy(model)
    torch._dynamo.reset()
    compile_blocks(compiled)
    graphs_before = counters["stats"]["unique_graphs"]
    loss_and_grads(compiled, batch)
    assert counters["stats"]["unique_graphs"] - graphs_before == 3  # the ViT layers, the LLM's, its last layer
    loss_and_grads(compiled, other)
    assert counters["stats"]["unique_graphs"] - graphs_before == 3


def test_the_trainer_hands_the_model_what_the_layout_makes(model, training_items, tmp_path):
    from transformers import TrainingArguments

    from internvl_chat.train.trainer import InternVLTrainer

    arguments = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = InternVLTrainer(model=model, args=arguments, layout=PER_CAPTION)
    batch = trainer.data_collator(training_items)
    trainer.current_gradient_accumulation_steps = 2  # set by the training loop
    logits = []
    handle = model.base_language_model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, output: logits.append(output.shape)
    )
    loss = trainer.training_step(model, batch)
    handle.remove()
    with torch.no_grad():
        reference = model(**concat_pad_data_collator(training_items)).loss
    assert torch.allclose(loss, reference / 2, rtol=1e-6)  # its share of a step of two micro-batches
    slots = int((concat_pad_data_collator(training_items)["labels"][:, 1:] != -100).sum(dim=1).max())
    assert logits[0][1] == slots  # the supervised rows only: the fast path ran


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_sequences_grouped_by_image_match_per_caption_batches(model, training_dataset, attention):
    """One sequence per picture (prefix once, captions as segments) trains exactly like the per-caption
    micro-batch of the same captions: same loss, same LoRA gradients, with full logits and with supervised ones
    (the last layer at the captions' supervised rows, under those rows of the block mask)."""
    items = grouped_items(training_dataset)
    faithful = loss_and_grads(with_llm_attention(model, attention), concat_pad_data_collator(items))
    grouped_batch = image_grouped_collator(items)
    assert grouped_batch["pixel_values"].shape[0] == items[0]["pixel_values"].shape[0] * 2  # each image once
    per_caption_counts, grouped_counts = batch_counts(concat_pad_data_collator(items)), batch_counts(grouped_batch)
    assert per_caption_counts.captions == grouped_counts.captions == 6  # what throughput logging counts
    assert per_caption_counts.supervised == grouped_counts.supervised
    assert grouped_batch["input_ids"].shape[1] < sum(len(item["input_ids"]) for item in items[:3])
    assert grouped_batch["input_ids"].shape[1] % GROUPED_LENGTH_MULTIPLE == 0  # one compiled graph for every batch
    for supervised_logits_only in (False, True):
        layout = BatchLayout(
            group_by_image=True, supervised_logits_only=supervised_logits_only, requested_attention=attention
        )
        assert layout.llm_attention == attention
        assert_same(faithful, loss_and_grads(model, layout_inputs(layout, items)), loss_rtol=1e-5, rtol=1e-3, atol=1e-7)


def test_grouped_padding_to_fewer_shapes_changes_nothing(model, training_dataset):
    """Padding grouped sequences further (fewer distinct batch shapes) adds rows that nothing attends to."""
    items = grouped_items(training_dataset)
    aligned, bucketed = image_grouped_collator(items), image_grouped_collator(items, length_multiple=64)
    assert bucketed["input_ids"].shape[1] % 64 == 0 and bucketed["input_ids"].shape[1] > aligned["input_ids"].shape[1]
    assert_same(loss_and_grads(model, aligned), loss_and_grads(model, bucketed), loss_rtol=1e-5, rtol=1e-3)
    with pytest.raises(ValueError, match="multiple of"):
        image_grouped_collator(items, length_multiple=GROUPED_LENGTH_MULTIPLE + 4)


def test_the_grouped_layout_gives_the_llm_an_attention_that_takes_the_mask():
    """Flash attention (the default where flash-attn imports) cannot take the captions' block mask, so grouped by
    image the LLM gets the prefix split unless another attention that can is asked for; the ViT keeps the
    request."""
    for requested in (None, "flash_attention_2"):
        layout = BatchLayout(group_by_image=True, requested_attention=requested)
        assert layout.attn_implementation() == {"vision_config": requested, "llm_config": PREFIX_SPLIT_ATTENTION}
    for requested in ("flex_attention", "sdpa", "eager"):
        assert BatchLayout(group_by_image=True, requested_attention=requested).llm_attention == requested
    assert BatchLayout(requested_attention="eager").attn_implementation() == "eager"  # per caption: as asked
    assert BatchLayout().attn_implementation() is None  # the model's default
    with pytest.raises(ValueError, match="group_by_length"):
        BatchLayout(group_by_image=True, group_by_length=True)


def test_flex_attention_gets_the_grouped_mask_as_a_block_mask(model, training_dataset):
    """Under flex attention the grouped mask reaches the model as a BlockMask that allows exactly what the dense
    mask allows, and the loss equals SDPA's under the dense mask. Forward only: PyTorch has no flex attention
    backward on the CPU (the gradients: test_flex_attention_trains_like_sdpa_on_cuda)."""
    from torch.nn.attention.flex_attention import BlockMask

    items = grouped_items(training_dataset)
    dense = image_grouped_collator(items)["attention_mask"]
    flex = BatchLayout(group_by_image=True, supervised_logits_only=True, requested_attention="flex_attention")
    inputs = layout_inputs(flex, items)
    converted = inputs["attention_mask"]
    assert isinstance(converted, BlockMask)
    rows, length = dense.shape[0], dense.shape[-1]
    b, q, kv = (
        torch.arange(n).view(*shape) for n, shape in ((rows, (-1, 1, 1)), (length, (1, -1, 1)), (length, (1, 1, -1)))
    )
    assert torch.equal(converted.mask_mod(b, 0, q, kv), dense[:, 0])
    model.eval()
    try:
        with torch.no_grad():
            flex_loss = with_llm_attention(model, "flex_attention")(**inputs).loss
            sdpa = BatchLayout(group_by_image=True, supervised_logits_only=True, requested_attention="sdpa")
            sdpa_loss = with_llm_attention(model, "sdpa")(**layout_inputs(sdpa, items)).loss
    finally:
        model.train()
    assert torch.allclose(flex_loss, sdpa_loss, rtol=1e-5)


@pytest.mark.parametrize("first_row", [0, 40])
def test_block_mask_from_dense_lists_the_blocks_create_block_mask_lists(training_dataset, first_row):
    """The BlockMask built by reductions over the dense mask has create_block_mask's partial and full blocks (the
    whole mask, and the rows of a prefix split's tail)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from internvl_chat.train.attention import block_mask_from_dense

    mask = image_grouped_collator(grouped_items(training_dataset))["attention_mask"][:, :, first_row:]
    batch, _, q_length, kv_length = mask.shape
    reference = create_block_mask(
        lambda b, h, q, kv: mask[b, 0, q, kv], batch, None, q_length, kv_length, device="cpu", BLOCK_SIZE=16
    )
    built = block_mask_from_dense(mask, block=16)
    assert built.shape == reference.shape and torch.equal(built.to_dense(), reference.to_dense())
    for counts, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        expected, got = getattr(reference, counts), getattr(built, counts)
        assert torch.equal(got, expected) and expected.sum() > 0, counts
        for row, q_block in torch.ones_like(expected[:, 0]).nonzero().tolist():
            n = int(expected[row, 0, q_block])
            assert sorted(getattr(built, indices)[row, 0, q_block, :n].tolist()) == sorted(
                getattr(reference, indices)[row, 0, q_block, :n].tolist()
            )


def test_causal_head_length_finds_the_rows_before_the_second_caption(training_dataset):
    """Rows up to the end of each sequence's first caption are plain causal; the head is the shortest of those
    over the batch, rounded down, and every row before it is exactly causal."""
    batch = image_grouped_collator(grouped_items(training_dataset))
    mask = batch["attention_mask"]
    first_caption_ends = []
    for positions in batch["position_ids"]:  # the second caption's positions restart after the prompt's
        first_caption_ends.append(int((positions[1:] <= positions[:-1]).nonzero()[0]) + 1)
    head = causal_head_length(mask, multiple=1)
    assert head == min(first_caption_ends) and 0 < head < mask.shape[-1]
    causal = torch.ones(head, head, dtype=torch.bool).tril()
    assert torch.equal(mask[:, 0, :head, :head], causal.expand(mask.shape[0], -1, -1))
    assert not mask[:, 0, :head, head:].any()
    assert causal_head_length(mask, multiple=8) == head // 8 * 8
    full = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    assert causal_head_length(full, multiple=2) == 6  # a mask that is causal throughout: all rows, rounded down


@pytest.fixture
def short_split_head(monkeypatch):
    """The tiny model's sequences are shorter than one 128-row head block: round to 8 rows instead."""
    monkeypatch.setattr(attention_module, "HEAD_MULTIPLE", 8)


def assert_grouped_trains_like_sdpa(model, items, attention, device=None, **tolerances):
    """A grouped step's loss and every LoRA gradient under `attention` equal SDPA's under the dense mask."""

    def run(name):
        layout = BatchLayout(group_by_image=True, supervised_logits_only=True, requested_attention=name)
        return loss_and_grads(with_llm_attention(model, layout.llm_attention), layout_inputs(layout, items, device))

    assert_same(run("sdpa"), run(attention), **tolerances)


def test_prefix_split_trains_like_sdpa_under_the_dense_mask(model, training_dataset, short_split_head):
    """The prefix split (causal kernel for the head rows, the mask for the rest) gives the loss and LoRA gradients
    of SDPA under the whole dense mask (fp32 CPU; the tail runs through SDPA here, flex attention on a GPU)."""
    items = grouped_items(training_dataset)
    mask = image_grouped_collator(items)["attention_mask"]
    tail = BatchLayout(group_by_image=True).collator()(items).attention_mask
    assert torch.equal(tail, mask[:, :, causal_head_length(mask) :]) and 0 < tail.shape[2] < mask.shape[2]
    assert_grouped_trains_like_sdpa(model, items, PREFIX_SPLIT_ATTENTION)


@pytest.mark.parametrize("llm", ["qwen2", "phi3", "llama"])
def test_prefix_split_serves_the_other_sizes_llms(make_lora_model, training_dataset, short_split_head, llm):
    """The split is an entry of transformers' attention table, so the LLMs of the other InternVL2 sizes (Qwen2,
    Phi-3, Llama, through transformers' own model classes) take it too: same loss and gradients as SDPA."""
    assert_grouped_trains_like_sdpa(make_lora_model(llm), grouped_items(training_dataset), PREFIX_SPLIT_ATTENTION)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention has no backward on the CPU")
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("attention", ["flex_attention", PREFIX_SPLIT_ATTENTION])
def test_flex_attention_trains_like_sdpa_on_cuda(model, training_dataset, short_split_head, compiled, attention):
    """The grouped step with flex attention (the whole mask as a BlockMask, or the prefix split's tail rows) gives
    SDPA's loss and LoRA gradients under the dense mask (fp32 GPU)."""
    model = copy.deepcopy(model).cuda()
    if compiled:
        torch._dynamo.reset()
        compile_blocks(model)
    assert_grouped_trains_like_sdpa(
        model, grouped_items(training_dataset), attention, device="cuda", loss_rtol=1e-4, rtol=1e-3, atol=1e-6
    )


def test_sdpa_gets_the_causal_kernel_not_a_dense_mask(model, training_items, monkeypatch):
    """A right-padded per-caption batch reaches SDPA without a mask, so SDPA runs its causal kernel: the pads'
    position ids (0 from the collator) must not make transformers build a packed-sequence mask. (The last
    layer's few supervised rows take a mask of their own.)"""
    import torch.nn.functional as F

    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, is_causal=False, **kwargs):
        if query.shape[-1] == model.config.llm_config.hidden_size // model.config.llm_config.num_attention_heads:
            calls.append((query.shape[2], key.shape[2], attn_mask is not None, is_causal))
        return sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    padded = concat_pad_data_collator(training_items)
    assert (padded["position_ids"][~padded["attention_mask"]] == 0).all()  # padded with 0, as the original
    inputs = layout_inputs(PER_CAPTION, training_items)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(**inputs)
    length, layers = padded["input_ids"].shape[1], model.config.llm_config.num_hidden_layers
    slots = int((padded["labels"][:, 1:] != -100).sum(dim=1).max())
    # the last layer: its supervised rows only, under their mask, the keys padded past the length to a multiple of 8
    keys = (length // ROWS_MASK_KEY_MULTIPLE + 1) * ROWS_MASK_KEY_MULTIPLE
    assert calls == [(length, length, False, True)] * (layers - 1) + [(slots, keys, True, False)]


def test_the_training_collator_counts_and_casts_in_the_loader_workers(
    model, training_dataset, training_items, tmp_path
):
    """The training collator counts captions, tokens and supervised positions on the CPU; training_step takes
    those counts out of the batch (the forward never sees them) instead of reading the batch's tensors. With
    --bf16 it also hands over the pixels in bf16."""
    from transformers import TrainingArguments

    from internvl_chat.train import trainer as trainer_module

    arguments = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = trainer_module.InternVLTrainer(
        model=copy.deepcopy(model), args=arguments, layout=PER_CAPTION, train_dataset=training_dataset
    )
    batch = trainer.data_collator(training_items)
    assert batch.counts == batch_counts(concat_pad_data_collator(training_items))
    assert batch.pixel_values.dtype == torch.float32  # fp32 training: pixels as the data pipeline gives them
    assert batch.image_flags is None  # every tile a picture's: the forward needs no selection (a host wait)
    items = [training_items[0], dict(training_items[1], image_flags=torch.zeros_like(training_items[1]["image_flags"]))]
    assert torch.equal(trainer.data_collator(items).image_flags, concat_pad_data_collator(items)["image_flags"])
    grouped = BatchLayout(group_by_image=True, requested_attention="sdpa").collator()(grouped_items(training_dataset))
    assert grouped.attention_mask.dim() == 4 and grouped.position_ids is not None  # positions restart per caption
    bf16 = PER_CAPTION.collator(torch.bfloat16)(training_items)
    assert bf16.pixel_values.dtype == torch.bfloat16  # cast in the loader workers, not on the way over
    assert torch.equal(bf16.pixel_values, batch.pixel_values.to(torch.bfloat16))
    eager = BatchLayout(group_by_image=True, requested_attention="eager").collator(torch.bfloat16)
    bias = eager(grouped_items(training_dataset)).attention_mask
    assert bias.dtype == torch.bfloat16 and bias.max() == 0 and bias.min() == torch.finfo(torch.bfloat16).min

    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    loss = trainer.training_step(trainer.model, batch)
    assert torch.isfinite(loss)  # the forward would refuse an unknown keyword argument
    assert trainer._window["samples"] == len(training_items) and trainer._window["tokens"] > 0


def test_padding_positions_continue_the_sequence():
    positions = torch.tensor([[0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 4, 5]])
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()
    assert positions_through_padding(positions, keep).tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("supervised_logits_only", [False, True])
def test_a_grouped_step_has_the_tutorials_gradient_on_the_same_captions(
    model, training_dataset, supervised_logits_only
):
    """The tutorial's step is the mean over its micro-batches (PER_DEVICE_BATCH_SIZE captions each) of their
    token-mean losses. A grouped step holds the same captions in other micro-batches (whole pictures); with
    caption_weights it has the same loss and the same LoRA gradients as the tutorial's micro-batches made of its
    captions cut, in order, into runs of the per-device batch; a step of fewer captions is still a mean over them."""
    groups = training_dataset.datasets[0].image_groups()
    pictures = [[training_dataset[i] for i in group] for group in groups[:3]]  # 15 captions
    per_device, accumulation = 5, 3  # the tutorial's step on this rank: 3 micro-batches of 5 captions
    captions = [item for picture in pictures for item in picture]
    model.zero_grad()
    tutorial_micro_batches = [captions[start : start + per_device] for start in range(0, len(captions), per_device)]
    assert len(tutorial_micro_batches) == accumulation
    tutorial_loss = 0.0
    for items in tutorial_micro_batches:  # the faithful path: full logits, each micro-batch's token mean
        loss = model(**concat_pad_data_collator(items)).loss / accumulation
        loss.backward()
        tutorial_loss += loss.detach()
    tutorial = (tutorial_loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    layout = BatchLayout(
        group_by_image=True,
        supervised_logits_only=supervised_logits_only,
        requested_attention="sdpa",
        step=decide_step_shape(per_device, 1, True, accumulation=accumulation),
    )
    collate = layout.collator()
    grouped_micro_batches = [collate(pictures[0] + pictures[1]), collate(pictures[2])]  # another cut: 10 + 5
    model.zero_grad()
    grouped_loss = run_step(model, grouped_micro_batches, layout)  # what the Trainer and the benchmark run
    grouped = (grouped_loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert_same(tutorial, grouped, loss_rtol=1e-5, rtol=1e-3, atol=1e-7)
    # and not by chance: the plain token mean of each grouped micro-batch weighs the captions otherwise
    plain = sum(
        model(**layout.model_inputs(collate(items))).loss / 2 for items in (pictures[0] + pictures[1], pictures[2])
    )
    assert not torch.allclose(plain.detach(), tutorial_loss, rtol=1e-4)
    # a step of one picture (5 captions, one run): its plain token mean, as a tutorial step of one micro-batch
    (alone,) = weigh_step([collate(pictures[2])], layout)
    alone_loss = micro_batch_loss(model, alone, layout, micro_batches=1)
    plain_alone = model(**layout.model_inputs(collate(pictures[2]))).loss
    assert torch.allclose(alone_loss, plain_alone, rtol=1e-5)
    # on two ranks each rank's weights double (the ranks' gradients are averaged) and the step's captions count
    two_ranks = caption_weights([alone], per_device, step_captions=10, ranks=2)[0]
    assert torch.allclose(two_ranks, alone.loss_rows.weights, rtol=1e-6)


def test_the_grouped_step_shape_keeps_the_tutorials_global_batch():
    """Grouped by image the launcher's per-device batch and accumulation become fewer, larger micro-batches of whole
    pictures; their product, and so the global batch, stays; a step too small for a picture is refused."""
    for per_device, accumulation, shape in (
        (4, 16, (16, 4)),
        (4, 2, (8, 1)),
        (4, 4, (16, 1)),
        (2, 8, (16, 1)),
        (1, 16, (16, 1)),
    ):
        step = decide_step_shape(per_device, 1, True, accumulation=accumulation)
        assert (step.micro_batch, step.micro_batches) == shape
        assert shape[0] * shape[1] == per_device * accumulation
    per_caption = decide_step_shape(4, 1, False, accumulation=16)  # per caption: as is
    assert (per_caption.micro_batch, per_caption.micro_batches) == (4, 16)
    with pytest.raises(ValueError, match="raise BATCH_SIZE to 8 or more captions a process"):
        decide_step_shape(2, 1, True, accumulation=1)


def test_the_launchers_batch_size_decides_the_step_once():
    """BATCH_SIZE (--global_batch_size) over PER_DEVICE_BATCH_SIZE x processes is the tutorial's accumulation, which
    the grouped mode then reshapes; a batch that does not divide, or a contradicting accumulation, is refused."""
    step = decide_step_shape(4, 8, False, global_batch_size=512)
    assert (step.per_device_captions, step.accumulation, step.micro_batch, step.micro_batches) == (4, 16, 4, 16)
    grouped = decide_step_shape(4, 8, True, global_batch_size=512)
    assert (grouped.accumulation, grouped.micro_batch, grouped.micro_batches) == (16, 16, 4)
    with pytest.raises(ValueError, match="BATCH_SIZE=500 is not a multiple of PER_DEVICE_BATCH_SIZE x GPUS x NNODES"):
        decide_step_shape(4, 8, False, global_batch_size=500)
    with pytest.raises(ValueError, match="give one of the two"):
        decide_step_shape(4, 8, False, global_batch_size=512, accumulation=8)


@pytest.fixture(scope="module", params=["internlm2", "qwen2"])
def internvl2_5_world(request, tmp_path_factory, tiny_tokenizer, tiny_qwen2_tokenizer, make_lora_model):
    """InternVL2.5/3 data and model: three synthetic COCO pictures encoded with the internvl2_5 template (its
    turn-by-turn labels, the unsupervised newline after each <|im_end|>) by InternLM2.5's kind of tokenizer or
    Qwen2.5's, and a tiny LoRA model of that LLM family."""
    from internvl_chat.data.dataset import build_datasets
    from internvl_chat.data.preprocess import ConversationTokenizer
    from internvl_chat.devkit.coco import make_synthetic_coco

    family = request.param
    tokenizer = tiny_tokenizer if family == "internlm2" else tiny_qwen2_tokenizer
    root = tmp_path_factory.mktemp(f"coco_{family}")
    make_synthetic_coco(root / "coco", train_images=3, test_images=1, seed=2, meta_path=root / "meta.json")
    encoder = ConversationTokenizer(tokenizer, "internvl2_5", 64, 8192)
    dataset = build_datasets(root / "meta.json", encoder, image_size=224, max_dynamic_patch=2)
    lora = make_lora_model(family, "2.5" if family == "internlm2" else "3", tokenizer)
    return with_llm_attention(lora, "sdpa"), dataset


def test_the_fast_modes_train_internvl2_5_data_as_the_faithful_path(internvl2_5_world):
    """On InternVL2.5/3 data the supervised-rows path and the grouped mode give the faithful loss and LoRA gradients."""
    model, dataset = internvl2_5_world
    items = grouped_items(dataset)
    last_labels = [int(item["labels"][-1]) for item in items]
    # the newline after each <|im_end|> is unsupervised: the internvl2_5 labels reached the batch
    assert last_labels == [IGNORE_INDEX] * len(items)
    faithful = loss_and_grads(model, concat_pad_data_collator(items))
    assert_same(faithful, loss_and_grads(model, layout_inputs(PER_CAPTION, items)))
    grouped = BatchLayout(group_by_image=True, supervised_logits_only=True, requested_attention="sdpa")
    assert_same(faithful, loss_and_grads(model, layout_inputs(grouped, items)), loss_rtol=1e-5, rtol=1e-3, atol=1e-7)
