"""Fast training modes give the original's loss and LoRA gradients (fp32, CPU, tiny model)."""
import copy

import pytest
import torch

from internvl_chat.data.collator import concat_pad_data_collator, shared_image_collator
from internvl_chat.data.dataset import build_datasets
from internvl_chat.data.preprocess import ConversationTokenizer
from internvl_chat.model.configuration_internvl_chat import InternVLChatConfig
from internvl_chat.model import shared_image_attention
from internvl_chat.model.modeling_internlm2 import ROWS_MASK_KEY_MULTIPLE
from internvl_chat.model.modeling_internvl_chat import InternVLChatModel, block_mask_attention
from internvl_chat.model.shared_image_attention import PREFIX_SPLIT_ATTENTION, causal_head_length
from internvl_chat.synthetic.checkpoint import tiny_config_dict, tokenizer_corpus
from internvl_chat.synthetic.coco import make_synthetic_coco
from internvl_chat.synthetic.tokenizer import build_tiny_tokenizer


def tiny_lora_model(vocab_size: int, img_context_token_id: int, llm: str = "internlm2") -> InternVLChatModel:
    torch.manual_seed(0)
    model = InternVLChatModel(InternVLChatConfig(**tiny_config_dict(llm=llm, vocab_size=vocab_size, image_size=224)))
    model.img_context_token_id = img_context_token_id
    for parameter in model.parameters():
        parameter.requires_grad = False
    model.wrap_llm_lora(r=8, lora_alpha=16, lora_dropout=0.0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)  # as after some training: B != 0, so A gets gradients too
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    tokenizer = build_tiny_tokenizer(root / "tok", tokenizer_corpus())
    make_synthetic_coco(root / "coco", train_images=3, test_images=1, seed=2, meta_path=root / "meta.json")
    model = tiny_lora_model(len(tokenizer), tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    encoder = ConversationTokenizer(tokenizer, "internlm2-chat", model.num_image_token, 4096)
    dataset = build_datasets(root / "meta.json", encoder, image_size=224, max_dynamic_patch=2)
    batch = concat_pad_data_collator([dataset[i] for i in (0, 5, 9)])  # different captions, padded
    return model, batch, dataset


def loss_and_grads(model, batch, **options):
    model.zero_grad()
    loss = model(**batch, **options).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_loss_and_grads(model, reference_batch, batch):
    """Two batchings of the same captions (supervised logits): the same loss and LoRA gradients, fp32."""
    loss, grads = loss_and_grads(model, reference_batch, logits_for_labels_only=True)
    other_loss, other_grads = loss_and_grads(model, batch, logits_for_labels_only=True)
    assert torch.allclose(other_loss, loss, rtol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(other_grads[name], grad, rtol=1e-4, atol=1e-8), name


def test_supervised_logits_only_matches_the_full_logits(setup):
    model, batch, _ = setup
    reference_loss, reference_grads = loss_and_grads(model, batch)
    fast_loss, fast_grads = loss_and_grads(model, batch, logits_for_labels_only=True)
    assert torch.allclose(fast_loss, reference_loss, rtol=1e-6, atol=1e-7)
    assert reference_grads.keys() == fast_grads.keys() and len(fast_grads) == 2 * 5 * 2
    for name, grad in reference_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(fast_grads[name], grad, rtol=1e-4, atol=1e-8), name



def test_supervised_logits_compute_the_last_layer_at_the_supervised_rows_only(setup):
    """Nothing reads the last decoder layer's other rows: its attention output, MLP and the LM head run at the
    supervised positions only (R slots a sequence, the most of any sequence), the other layers at every row."""
    model, batch, _ = setup
    layers = model.language_model.get_base_model().model.layers
    rows_seen = []
    hooks = [layer.feed_forward.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[1]))
             for layer in layers]
    try:
        output = model(**batch, logits_for_labels_only=True)
    finally:
        for hook in hooks:
            hook.remove()
    slots = int((batch["labels"][:, 1:] != -100).sum(dim=1).max())
    length = batch["input_ids"].shape[1]
    assert rows_seen == [length] * (len(layers) - 1) + [slots] and slots < length
    assert output.logits.shape == (batch["input_ids"].shape[0], slots, model.config.llm_config.vocab_size)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_right_padding_needs_no_mask(setup, attn):
    """The collator pads on the right; the forward then drops the mask (causal attention never lets a real token
    see a pad). Loss and gradients equal those with the padding spelled out as a 4D mask, which is kept."""
    model, batch, _ = setup
    assert not batch["attention_mask"].all()  # the batch really is padded
    model.language_model.config._attn_implementation = attn
    length = batch["input_ids"].shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    explicit = dict(batch, attention_mask=causal[None, None] & batch["attention_mask"].bool()[:, None, None, :])
    try:
        loss, grads = loss_and_grads(model, batch)
        masked_loss, masked_grads = loss_and_grads(model, explicit)
    finally:
        model.language_model.config._attn_implementation = "sdpa"
    assert torch.allclose(loss, masked_loss, rtol=1e-6, atol=1e-7)
    for name, grad in masked_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-8), name


def test_compiled_blocks_give_the_same_loss_and_gradients(setup):
    model, batch, _ = setup
    reference_loss, reference_grads = loss_and_grads(model, batch, logits_for_labels_only=True)
    compiled = copy.deepcopy(model)
    assert compiled.compile_blocks() == 2 + 2  # the tiny model's ViT layers and decoder layers
    loss, grads = loss_and_grads(compiled, batch, logits_for_labels_only=True)
    assert torch.allclose(loss, reference_loss, rtol=1e-5, atol=1e-6)
    for name, grad in reference_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-3, atol=1e-6), name
    assert sorted(compiled.state_dict()) == sorted(model.state_dict())  # checkpoints keep their keys


def test_each_compiled_stack_is_one_graph(setup):
    """All decoder layers of a step but the last run one compiled graph, and so do all ViT layers; the last
    decoder layer, which computes the supervised rows only, is the third graph. Another graph costs another
    compile of forward and backward (tens of seconds for a 2B model on a GPU) and, when its case first appears
    mid-run, a stall; so batches of other lengths and other numbers of supervised rows add none. The first
    decoder layer used to get a view of the embeddings as input, a guarded difference from the other layers."""
    from torch._dynamo.utils import counters

    model, _, dataset = setup
    groups = dataset.datasets[0].image_groups()
    batch = shared_image_collator([[dataset[i] for i in group[:3]] for group in groups[:2]])
    other = shared_image_collator([[dataset[i] for i in group[:2]] for group in groups[1:3]])
    assert other["input_ids"].shape != batch["input_ids"].shape
    compiled = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled.compile_blocks()
    graphs_before = counters["stats"]["unique_graphs"]
    loss_and_grads(compiled, batch, logits_for_labels_only=True)
    assert counters["stats"]["unique_graphs"] - graphs_before == 3  # the ViT layers, the LLM's, its last layer
    loss_and_grads(compiled, other, logits_for_labels_only=True)
    assert counters["stats"]["unique_graphs"] - graphs_before == 3


def test_trainer_passes_the_fast_loss_flag(setup, tmp_path):
    from transformers import TrainingArguments

    from internvl_chat.train.trainer import InternVLTrainer

    model, batch, _ = setup
    arguments = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    fast = InternVLTrainer(model=model, args=arguments, supervised_logits_only=True)
    with torch.no_grad():
        loss, outputs = fast.compute_loss(model, dict(batch), return_outputs=True)
        reference = model(**batch).loss
    assert torch.allclose(loss, reference, rtol=1e-6)
    assert outputs.logits.shape[1] == int((batch["labels"][:, 1:] != -100).sum(dim=1).max())  # the fast path ran


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_image_sequences_match_per_caption_batches(setup, attn):
    """One sequence per picture (prefix once, captions as segments) trains exactly like the per-caption
    micro-batch of the same captions: same loss, same LoRA gradients."""
    from internvl_chat.data.collator import MASK_LENGTH_MULTIPLE, batch_counts

    model, _, dataset = setup
    groups = dataset.datasets[0].image_groups()
    first, second = [[dataset[i] for i in group[:3]] for group in groups[:2]]
    previous = model.config.llm_config._attn_implementation
    model.config.llm_config._attn_implementation = attn
    try:
        reference_loss, reference_grads = loss_and_grads(model, concat_pad_data_collator(first + second))
        grouped = shared_image_collator([first, second])
        assert grouped["pixel_values"].shape[0] == first[0]["pixel_values"].shape[0] * 2  # each image once
        per_caption_counts, grouped_counts = batch_counts(concat_pad_data_collator(first + second)), batch_counts(grouped)
        assert per_caption_counts.captions == grouped_counts.captions == 6  # what throughput logging counts
        assert per_caption_counts.supervised == grouped_counts.supervised
        assert grouped["input_ids"].shape[1] < sum(len(item["input_ids"]) for item in first)
        assert grouped["input_ids"].shape[1] % MASK_LENGTH_MULTIPLE == 0  # one compiled graph for every batch
        grouped_loss, grouped_grads = loss_and_grads(model, grouped)
        fast_loss, fast_grads = loss_and_grads(model, grouped, logits_for_labels_only=True)
    finally:
        model.config.llm_config._attn_implementation = previous
    assert torch.allclose(grouped_loss, reference_loss, rtol=1e-5)
    assert torch.allclose(fast_loss, reference_loss, rtol=1e-5)
    for name, grad in reference_grads.items():
        assert torch.allclose(grouped_grads[name], grad, rtol=1e-3, atol=1e-7), name
        # the last layer at the captions' supervised rows, under those rows of the block mask
        assert torch.allclose(fast_grads[name], grad, rtol=1e-3, atol=1e-7), name


def test_shared_image_padding_to_fewer_shapes_changes_nothing(setup):
    """Padding shared-image sequences further (fewer distinct batch shapes) adds rows that nothing attends to."""
    from internvl_chat.data.collator import MASK_LENGTH_MULTIPLE

    model, _, dataset = setup
    groups = dataset.datasets[0].image_groups()
    items = [[dataset[i] for i in group[:3]] for group in groups[:2]]
    aligned, bucketed = shared_image_collator(items), shared_image_collator(items, length_multiple=64)
    assert bucketed["input_ids"].shape[1] % 64 == 0 and bucketed["input_ids"].shape[1] > aligned["input_ids"].shape[1]
    assert_same_loss_and_grads(model, aligned, bucketed)
    with pytest.raises(ValueError, match="multiple of"):
        shared_image_collator(items, length_multiple=MASK_LENGTH_MULTIPLE + 4)


def test_per_caption_padding_to_fewer_lengths_changes_nothing(setup):
    """--pad_to_multiple_of 16 (fewer distinct lengths, fewer cuDNN plans): the trainer's collator pads further on
    the right and drops the mask; loss and gradients are the original padding's, which is the default."""
    from functools import partial

    from internvl_chat.data.collator import PAD_LENGTH_MULTIPLE
    from internvl_chat.train.trainer import COUNTS_KEY, TrainingCollator

    model, _, dataset = setup
    items = [dataset[i] for i in (0, 5, 9)]
    original = concat_pad_data_collator(items)
    assert concat_pad_data_collator(items, length_multiple=PAD_LENGTH_MULTIPLE)["input_ids"].shape == \
        original["input_ids"].shape  # the default pads as the original: to the longest sample
    collate = TrainingCollator(partial(concat_pad_data_collator, length_multiple=16))
    rounded = {key: value for key, value in collate(items).items() if key != COUNTS_KEY}
    length = rounded["input_ids"].shape[1]
    assert length % 16 == 0 and length > original["input_ids"].shape[1]
    assert "attention_mask" not in rounded  # right padding: no mask, as the trainer runs it
    assert_same_loss_and_grads(model, original, rounded)
    with pytest.raises(ValueError, match=">= 1"):
        concat_pad_data_collator(items, length_multiple=0)


def shared_image_batch(dataset, captions=3):
    groups = dataset.datasets[0].image_groups()
    return shared_image_collator([[dataset[i] for i in group[:captions]] for group in groups[:2]])


@pytest.fixture
def flex_attention_llm(setup):
    model = setup[0]
    model.config.llm_config._attn_implementation = "flex_attention"
    yield model
    model.config.llm_config._attn_implementation = "sdpa"
    model.train()


def test_flex_attention_gets_the_shared_image_mask_as_a_block_mask(setup, flex_attention_llm):
    """Under flex attention the shared-image mask becomes a BlockMask that allows exactly what the dense mask
    allows, and the loss equals SDPA's under the dense mask. Forward only: PyTorch has no flex attention backward
    on the CPU (the gradients: test_flex_attention_trains_like_sdpa_on_cuda)."""
    from torch.nn.attention.flex_attention import BlockMask

    model, _, dataset = setup
    batch = shared_image_batch(dataset)
    dense = batch["attention_mask"]
    converted, _ = model._attention_inputs_for_backend(dense, batch["position_ids"], torch.float32)
    assert isinstance(converted, BlockMask)
    rows, length = dense.shape[0], dense.shape[-1]
    b, q, kv = (torch.arange(n).view(*shape) for n, shape in
                ((rows, (-1, 1, 1)), (length, (1, -1, 1)), (length, (1, 1, -1))))
    assert torch.equal(converted.mask_mod(b, 0, q, kv), dense[:, 0])
    model.eval()
    with torch.no_grad():
        flex_loss = model(**batch, logits_for_labels_only=True).loss
        model.config.llm_config._attn_implementation = "sdpa"
        sdpa_loss = model(**batch, logits_for_labels_only=True).loss
    assert torch.allclose(flex_loss, sdpa_loss, rtol=1e-5)


@pytest.mark.parametrize("first_row", [0, 40])
def test_block_mask_from_dense_lists_the_blocks_create_block_mask_lists(setup, first_row):
    """The BlockMask built by reductions over the dense mask has create_block_mask's partial and full blocks (the
    whole mask, and the rows of a prefix split's tail)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from internvl_chat.model.shared_image_attention import block_mask_from_dense

    mask = shared_image_batch(setup[2])["attention_mask"][:, :, first_row:]
    batch, _, q_length, kv_length = mask.shape
    reference = create_block_mask(lambda b, h, q, kv: mask[b, 0, q, kv], batch, None, q_length, kv_length,
                                  device="cpu", BLOCK_SIZE=16)
    built = block_mask_from_dense(mask, block=16)
    assert built.shape == reference.shape and torch.equal(built.to_dense(), reference.to_dense())
    for counts, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        expected, got = getattr(reference, counts), getattr(built, counts)
        assert torch.equal(got, expected) and expected.sum() > 0, counts
        for row, q_block in torch.ones_like(expected[:, 0]).nonzero().tolist():
            n = int(expected[row, 0, q_block])
            assert sorted(getattr(built, indices)[row, 0, q_block, :n].tolist()) == \
                sorted(getattr(reference, indices)[row, 0, q_block, :n].tolist())


def test_shared_image_sequences_get_an_attention_that_takes_their_mask(setup):
    """--group_by_image: flash attention (the default where flash-attn imports) cannot take the captions' block
    mask, so the LLM gets the prefix split unless another attention that can is asked for; a forward that still
    meets flash attention with the mask stops with a clear error instead of attending across captions."""
    assert block_mask_attention(None) == block_mask_attention("flash_attention_2") == PREFIX_SPLIT_ATTENTION
    for requested in ("flex_attention", "sdpa", "eager"):
        assert block_mask_attention(requested) == requested
    model, _, dataset = setup
    batch = shared_image_batch(dataset)
    model.config.llm_config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="cannot take the"):
            model._attention_inputs_for_backend(batch["attention_mask"], batch["position_ids"], torch.float32)
    finally:
        model.config.llm_config._attn_implementation = "sdpa"


def test_causal_head_length_finds_the_rows_before_the_second_caption(setup):
    """Rows up to the end of each sequence's first caption are plain causal; the head is the shortest of those
    over the batch, rounded down, and every row before it is exactly causal."""
    _, _, dataset = setup
    batch = shared_image_batch(dataset)
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
    monkeypatch.setattr(shared_image_attention, "HEAD_MULTIPLE", 8)


def assert_trains_like_sdpa(model, batch, attention: str, loss_rtol: float = 1e-6, rtol: float = 1e-4,
                            atol: float = 1e-8):
    """The shared-image step's loss and every LoRA gradient under `attention` equal SDPA's under the dense mask."""
    sdpa_loss, sdpa_grads = loss_and_grads(model, batch, logits_for_labels_only=True)
    model.config.llm_config._attn_implementation = attention
    try:
        loss, grads = loss_and_grads(model, batch, logits_for_labels_only=True)
    finally:
        model.config.llm_config._attn_implementation = "sdpa"
    assert torch.allclose(loss, sdpa_loss, rtol=loss_rtol)
    for name, grad in sdpa_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(grads[name], grad, rtol=rtol, atol=atol), name


def test_prefix_split_trains_like_sdpa_under_the_dense_mask(setup, short_split_head):
    """The prefix split (causal kernel for the head rows, the mask for the rest) gives the loss and LoRA gradients
    of SDPA under the whole dense mask (fp32 CPU; the tail runs through SDPA here, flex attention on a GPU)."""
    model, _, dataset = setup
    batch = shared_image_batch(dataset)
    mask = batch["attention_mask"]
    model.config.llm_config._attn_implementation = PREFIX_SPLIT_ATTENTION
    try:
        tail, _ = model._attention_inputs_for_backend(mask, batch["position_ids"], torch.float32)
    finally:
        model.config.llm_config._attn_implementation = "sdpa"
    assert torch.equal(tail, mask[:, :, causal_head_length(mask):]) and 0 < tail.shape[2] < mask.shape[2]
    assert_trains_like_sdpa(model, batch, PREFIX_SPLIT_ATTENTION)


@pytest.mark.parametrize("llm", ["qwen2", "phi3", "llama"])
def test_prefix_split_serves_the_other_sizes_llms(setup, short_split_head, llm):
    """The split is an entry of transformers' attention table, so the LLMs of the other InternVL2 sizes (Qwen2,
    Phi-3, Llama, through transformers' own model classes) take it too: same loss and gradients as SDPA."""
    reference, _, dataset = setup
    model = tiny_lora_model(reference.config.llm_config.vocab_size, reference.img_context_token_id, llm)
    assert_trains_like_sdpa(model, shared_image_batch(dataset), PREFIX_SPLIT_ATTENTION)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention has no backward on the CPU")
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("attention", ["flex_attention", PREFIX_SPLIT_ATTENTION])
def test_flex_attention_trains_like_sdpa_on_cuda(setup, short_split_head, compiled, attention):
    """The shared-image step with flex attention (the whole mask as a BlockMask, or the prefix split's tail rows)
    gives SDPA's loss and LoRA gradients under the dense mask (fp32 GPU)."""
    model, _, dataset = setup
    model = copy.deepcopy(model).cuda()
    if compiled:
        torch._dynamo.reset()
        model.compile_blocks()
    batch = {key: value.cuda() for key, value in shared_image_batch(dataset).items()}
    assert_trains_like_sdpa(model, batch, attention, loss_rtol=1e-4, rtol=1e-3, atol=1e-6)  # GPU kernels


def test_sdpa_gets_the_causal_kernel_not_a_dense_mask(setup, monkeypatch):
    """A right-padded per-caption batch reaches SDPA without a mask, so SDPA runs its causal kernel: the pads'
    position ids (0 from the collator) must not make transformers build a packed-sequence mask. (The last
    layer's few supervised rows take a mask of their own.)"""
    import torch.nn.functional as F

    model, batch, _ = setup
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, is_causal=False, **kwargs):
        if query.shape[-1] == model.config.llm_config.hidden_size // model.config.llm_config.num_attention_heads:
            calls.append((query.shape[2], key.shape[2], attn_mask is not None, is_causal))
        return sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    assert (batch["position_ids"][~batch["attention_mask"]] == 0).all()  # padded with 0, as the original
    with torch.no_grad():
        model(**batch, logits_for_labels_only=True)
    length, layers = batch["input_ids"].shape[1], model.config.llm_config.num_hidden_layers
    slots = int((batch["labels"][:, 1:] != -100).sum(dim=1).max())
    # the last layer: its supervised rows only, under their mask, the keys padded past the length to a multiple of 8
    padded = (length // ROWS_MASK_KEY_MULTIPLE + 1) * ROWS_MASK_KEY_MULTIPLE
    assert calls == [(length, length, False, True)] * (layers - 1) + [(slots, padded, True, False)]


def test_loader_workers_count_and_cast_for_the_trainer(setup, tmp_path, monkeypatch):
    """The training collator counts captions, tokens and supervised positions on the CPU; training_step takes
    those counts out of the batch (the forward never sees them) instead of reading the batch's tensors. With
    --bf16 it also hands over the pixels in bf16."""
    from transformers import TrainingArguments

    from internvl_chat.data.collator import batch_counts
    from internvl_chat.train import trainer as trainer_module

    model, _, dataset = setup
    arguments = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = trainer_module.InternVLTrainer(model=copy.deepcopy(model), args=arguments, train_dataset=dataset,
                                             data_collator=concat_pad_data_collator)
    batch = trainer.data_collator([dataset[i] for i in (0, 5, 9)])
    assert batch[trainer_module.COUNTS_KEY] == batch_counts(concat_pad_data_collator([dataset[i] for i in (0, 5, 9)]))

    def no_reads(_):
        raise AssertionError("training_step read the counts from the batch's tensors")

    assert batch["pixel_values"].dtype == torch.float32  # fp32 training: pixels as the data pipeline gives them
    assert "image_flags" not in batch  # every tile a picture's: the forward needs no selection (a host wait)
    # right padding: no mask and no position ids (0, 1, 2, ... in every row once the pads' are continued), as
    # the forward would make of them after host waits; the step trains exactly as from the padded batch
    assert "attention_mask" not in batch and "position_ids" not in batch
    padded = concat_pad_data_collator([dataset[i] for i in (0, 5, 9)])
    reference_loss, reference_grads = loss_and_grads(model, padded, logits_for_labels_only=True)
    loss, grads = loss_and_grads(model, {k: v for k, v in batch.items() if k != trainer_module.COUNTS_KEY},
                                 logits_for_labels_only=True)
    assert torch.allclose(loss, reference_loss, rtol=1e-6)
    for name, grad in reference_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-8), name
    from internvl_chat.data.collator import image_grouping_collator, packed_collator

    groups = dataset.datasets[0].image_groups()
    items = [dataset[i] for group in groups[:2] for i in group[:3]]
    grouped = trainer_module.TrainingCollator(image_grouping_collator)(items)
    assert torch.equal(grouped["attention_mask"], image_grouping_collator(items)["attention_mask"])  # 4D: kept
    assert torch.equal(grouped["position_ids"], image_grouping_collator(items)["position_ids"])
    packed = trainer_module.TrainingCollator(packed_collator)(items)
    assert torch.equal(packed["position_ids"], packed_collator(items)["position_ids"])  # restarting: kept
    items = [dataset[i] for i in (0, 5)]
    items[1] = dict(items[1], image_flags=torch.zeros_like(items[1]["image_flags"]))  # as a text-only sample's
    assert torch.equal(trainer.data_collator(items)["image_flags"], concat_pad_data_collator(items)["image_flags"])
    bf16_arguments = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=True)
    bf16_trainer = trainer_module.InternVLTrainer(model=copy.deepcopy(model), args=bf16_arguments,
                                                  train_dataset=dataset, data_collator=concat_pad_data_collator)
    bf16_batch = bf16_trainer.data_collator([dataset[i] for i in (0, 5, 9)])
    assert bf16_batch["pixel_values"].dtype == torch.bfloat16  # cast in the loader workers, not on the way over
    assert torch.equal(bf16_batch["pixel_values"], batch["pixel_values"].to(torch.bfloat16))
    assert torch.equal(bf16_batch["input_ids"], batch["input_ids"])
    grouped_items = [dataset[i] for group in groups[:2] for i in group[:3]]
    bf16_grouped = trainer_module.TrainingCollator(image_grouping_collator, torch.bfloat16)(grouped_items)
    assert bf16_grouped["attention_mask"].dtype == torch.bool and bf16_grouped["pixel_values"].dtype == torch.bfloat16

    monkeypatch.setattr(trainer_module, "batch_counts", no_reads)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    loss = trainer.training_step(trainer.model, batch)
    assert torch.isfinite(loss)  # the forward would refuse an unknown keyword argument
    assert trainer._window["samples"] == 3 and trainer._window["tokens"] > 0
    with torch.no_grad():  # evaluation batches come from the same collator
        assert torch.isfinite(trainer.compute_loss(trainer.model, batch))


def packed_and_padded(dataset, indices=(0, 5, 9, 12)):
    from internvl_chat.data.collator import packed_collator

    items = [dataset[i] for i in indices]  # different pictures and captions: the padded batch pads
    return packed_collator(items), concat_pad_data_collator(items)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_rows_train_like_padded_batches(setup, attn):
    """--pack_samples: the micro-batch's samples in one row without padding, each attending to itself only, give
    the padded batch's loss and LoRA gradients (full logits and supervised logits)."""
    model, _, dataset = setup
    packed, padded = packed_and_padded(dataset)
    assert not padded["attention_mask"].all()  # the padded batch really pads
    assert packed["input_ids"].shape == (1, int(padded["attention_mask"].sum()))  # no padding at all
    assert "attention_mask" not in packed
    model.config.llm_config._attn_implementation = attn
    try:
        reference_loss, reference_grads = loss_and_grads(model, padded)
        loss, grads = loss_and_grads(model, packed)
        fast_loss, fast_grads = loss_and_grads(model, packed, logits_for_labels_only=True)
    finally:
        model.config.llm_config._attn_implementation = "sdpa"
    assert torch.allclose(loss, reference_loss, rtol=1e-5) and torch.allclose(fast_loss, reference_loss, rtol=1e-5)
    for name, grad in reference_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(grads[name], grad, rtol=1e-3, atol=1e-7), name
        assert torch.allclose(fast_grads[name], grad, rtol=1e-3, atol=1e-7), name


def test_packed_rows_count_like_padded_batches_and_keep_samples_apart(setup):
    """Throughput and FLOP counts see the same captions, supervised positions and per-sample lengths; no
    sample's last token is trained to predict the next sample's first, and the mask never crosses samples."""
    from internvl_chat.data.collator import IGNORE_INDEX, batch_counts
    from internvl_chat.model.modeling_internvl_chat import packed_causal_mask

    _, _, dataset = setup
    packed, padded = packed_and_padded(dataset)
    assert batch_counts(packed) == batch_counts(padded)
    starts = packed["cu_seq_lens"][:-1].long()
    assert (packed["labels"][0, starts] == IGNORE_INDEX).all() and (packed["position_ids"][0, starts] == 0).all()
    assert packed["max_seq_len"] == int(padded["attention_mask"].sum(dim=1).max())
    length = packed["input_ids"].shape[1]
    mask = packed_causal_mask(packed["cu_seq_lens"], length)[0, 0]
    expected = torch.zeros(length, length, dtype=torch.bool)
    for start, end in zip(packed["cu_seq_lens"][:-1].tolist(), packed["cu_seq_lens"][1:].tolist()):
        expected[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    assert torch.equal(mask, expected)


@pytest.fixture
def varlen_spy():
    """An attention registered under a flash-attention name (flash-attn does not install on the CPU): it records
    the varlen kwargs it gets and computes each sample's causal attention with SDPA, as flash-attn's varlen
    kernel would, so the boundaries must reach it through every decoder layer."""
    import torch.nn.functional as F
    from transformers import AttentionInterface

    calls = []

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        calls.append((attention_mask, kwargs.get("max_length_q"), kwargs.get("max_length_k")))
        bounds = kwargs["cu_seq_lens_q"].tolist()
        parts = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                                scale=scaling, enable_gqa=True)
                 for a, b in zip(bounds[:-1], bounds[1:])]
        return torch.cat(parts, dim=2).transpose(1, 2), None

    AttentionInterface.register("flash_attention_varlen_spy", attention)
    return calls


@pytest.mark.parametrize("llm", ["internlm2", "qwen2", "phi3", "llama"])
def test_packed_rows_give_flash_attention_the_sample_boundaries(setup, varlen_spy, llm):
    """Under flash attention a packed row gets no mask: the samples' boundaries reach the varlen kernel as
    transformers' FlashAttentionKwargs, in our InternLM2 and in transformers' Qwen2, Phi-3 and Llama (the other
    sizes' LLMs), and the step trains like the padded batch."""
    reference, _, dataset = setup
    model = tiny_lora_model(reference.config.llm_config.vocab_size, reference.img_context_token_id, llm)
    packed, padded = packed_and_padded(dataset)
    reference_loss, reference_grads = loss_and_grads(model, padded, logits_for_labels_only=True)
    model.config.llm_config._attn_implementation = "flash_attention_varlen_spy"
    loss, grads = loss_and_grads(model, packed, logits_for_labels_only=True)
    layers = model.config.llm_config.num_hidden_layers
    if llm == "internlm2":  # its last layer: the supervised rows only, through SDPA under their own mask
        layers -= 1
    assert varlen_spy == [(None, packed["max_seq_len"], packed["max_seq_len"])] * layers
    assert torch.allclose(loss, reference_loss, rtol=1e-5)
    for name, grad in reference_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-3, atol=1e-7), name


def test_packed_attention_takes_a_request_else_the_fastest_varlen_backend():
    from internvl_chat.model.modeling_internvl_chat import packed_attention

    for requested in ("flex_attention", "sdpa", "eager", "flash_attention_2"):
        assert packed_attention(requested, "cuda") == requested
    assert packed_attention(None, "cpu") == "sdpa"  # flash-attn does not install here
    assert packed_attention(None, "cuda") == "flex_attention"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention has no backward on the CPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_packed_rows_train_like_padded_batches_with_flex_attention_on_cuda(setup, compiled):
    """The GPU path of --pack_samples without flash-attn: flex attention with the block-diagonal BlockMask gives
    the padded batch's loss and LoRA gradients (fp32 GPU; eager and compiled blocks)."""
    model, _, dataset = setup
    model = copy.deepcopy(model).cuda()
    if compiled:
        torch._dynamo.reset()
        model.compile_blocks()
    packed, padded = packed_and_padded(dataset)
    packed, padded = ({key: value.cuda() if isinstance(value, torch.Tensor) else value
                       for key, value in batch.items()} for batch in (packed, padded))
    reference_loss, reference_grads = loss_and_grads(model, padded, logits_for_labels_only=True)
    model.config.llm_config._attn_implementation = "flex_attention"
    try:
        loss, grads = loss_and_grads(model, packed, logits_for_labels_only=True)
    finally:
        model.config.llm_config._attn_implementation = "sdpa"
    assert torch.allclose(loss, reference_loss, rtol=1e-4)
    for name, grad in reference_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-3, atol=1e-6), name
