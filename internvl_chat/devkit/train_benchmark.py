"""The training benchmark's pieces (tools/benchmark_train.py, tools/gpu/profile_train_step.py): the fast modes as
combinations of the trainer's flags, COCO-shaped steps of captions, the model set up as the trainer sets it up for a
mode, and a step run through the recipe's own step (train/step.py), so that a benchmark measures what training runs.
"""

import time
from pathlib import Path

import torch

from ..checkpoint.loader import load_model, load_tokenizer
from ..data.dataset import build_datasets
from ..data.preprocess import ConversationTokenizer
from ..data.samplers import ImageGroupedBatchSampler
from ..model.configuration_internvl_chat import InternVLChatConfig
from ..model.conversation import IMG_CONTEXT_TOKEN
from ..train.arguments import ModelArguments
from ..train.batch import TrainingBatch
from ..train.batch_layout import BatchLayout
from ..train.model_setup import compile_blocks, prepare_for_training
from ..train.step import run_step
from ..train.step_shape import decide_step_shape
from .coco import make_synthetic_coco

FLAGS = ("supervised_logits_only", "no_grad_checkpoint", "compile_blocks", "group_by_image")
PRESETS = {
    "fast": "supervised_logits_only+no_grad_checkpoint+compile_blocks",
    "fast_grouped": "supervised_logits_only+no_grad_checkpoint+compile_blocks+group_by_image",
}
DEFAULT_MODES = "faithful,fast,fast_grouped"


def parse_mode(text: str) -> frozenset:
    flags = frozenset(PRESETS.get(text, text).split("+")) - {"faithful"}
    unknown = flags - set(FLAGS)
    if unknown:
        raise ValueError(
            f"unknown flag(s) {sorted(unknown)} in mode {text!r}; known: faithful, "
            f"{', '.join(FLAGS)}, {', '.join(PRESETS)}"
        )
    return flags


def mode_name(flags: frozenset) -> str:
    return "+".join(flag for flag in FLAGS if flag in flags) or "faithful"


def layout_of(flags: frozenset, attention: str | None, batch: int, accumulation: int) -> BatchLayout:
    """The trainer's layout for a mode, at the launcher's step on one GPU: PER_DEVICE_BATCH_SIZE `batch`,
    `accumulation` micro-batches of it (grouped by image, the same captions in fewer micro-batches)."""
    grouped = "group_by_image" in flags
    return BatchLayout(
        group_by_image=grouped,
        supervised_logits_only="supervised_logits_only" in flags,
        requested_attention=attention,
        step=decide_step_shape(batch, 1, grouped, accumulation=accumulation),
    )


def prepare_data(args, model_dir: Path, work: Path) -> dict:
    """Each optimizer step's micro-batches of dataset items, as the trainer would draw them on one GPU with
    PER_DEVICE_BATCH_SIZE --batch and an accumulation of --accumulation: per caption, --accumulation micro-batches
    of --batch random captions; grouped by image, whole pictures with about --batch x --accumulation captions in
    fewer micro-batches (step_shape.decide_step_shape). With --same-captions, the per-caption steps take exactly
    the grouped steps' captions, cut into micro-batches of --batch in their order."""
    tokenizer = load_tokenizer(model_dir)
    config = InternVLChatConfig.from_pretrained(model_dir)
    steps = args.steps + args.warmup
    images = (args.batch * args.accumulation * steps) // 4 + 8  # enough pictures of 5 captions, with a margin
    make_synthetic_coco(
        work / "coco",
        train_images=images,
        test_images=1,
        seed=0,
        image_size=None if args.coco_sizes else (640, 480),
        meta_path=work / "meta.json",
        force=True,
    )
    encoder = ConversationTokenizer(tokenizer, config.template, config.num_image_token, 4096)
    dataset = build_datasets(work / "meta.json", encoder, image_size=config.tile_size, max_dynamic_patch=6)
    micro_batches = layout_of(frozenset({"group_by_image"}), None, args.batch, args.accumulation).step.micro_batches
    sampler = ImageGroupedBatchSampler(
        dataset.datasets[0].image_groups(), args.batch * args.accumulation, micro_batches
    )
    batches = list(sampler)
    grouped = [
        [[dataset[i] for i in batch] for batch in batches[step * micro_batches : (step + 1) * micro_batches]]
        for step in range(steps)
    ]
    if args.same_captions:
        per_caption = [
            [items[start : start + args.batch] for start in range(0, len(items), args.batch)]
            for items in ([item for batch in step for item in batch] for step in grouped)
        ]
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
        per_step = args.batch * args.accumulation
        per_caption = [
            [
                [dataset[order[step * per_step + micro * args.batch + i]] for i in range(args.batch)]
                for micro in range(args.accumulation)
            ]
            for step in range(steps)
        ]
    return {"per_caption": per_caption, "grouped": grouped}


def set_up(model_dir: Path, flags: frozenset, args, device):
    """The model as the trainer sets it up for this mode, its layout and a fresh AdamW on the adapters."""
    layout = layout_of(flags, args.attn_implementation, args.batch, args.accumulation)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(model_dir, dtype=dtype, device=device, attn_implementation=layout.attn_implementation())
    model.img_context_token_id = load_tokenizer(model_dir).convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    model_args = ModelArguments(
        freeze_llm=True,
        freeze_backbone=True,
        freeze_mlp=True,
        use_llm_lora=128,
        lora_dropout=args.lora_dropout,
        grad_checkpoint="no_grad_checkpoint" not in flags,
    )
    torch.manual_seed(0)  # the same initial adapters in every mode
    prepare_for_training(model, model_args)
    if "compile_blocks" in flags:
        torch._dynamo.reset()  # each compiled mode compiles what it needs, as a run of its own
        compile_blocks(model)
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, fused=device.type == "cuda"
    )
    return model, layout, optimizer


def device_steps(layout: BatchLayout, steps: list[list[list[dict]]], device) -> list[list[TrainingBatch]]:
    """Each step's micro-batches collated by the layout's collator and put on the device, where the Trainer's
    batches are when its training step runs."""
    collate = layout.collator(torch.bfloat16 if device.type == "cuda" else torch.float32)
    return [[collate(items).to(device) for items in step] for step in steps]


def train_step(model, layout: BatchLayout, step: list[TrainingBatch], optimizer, device) -> torch.Tensor:
    """The recipe's step (train/step.py run_step: the step's loss weights, each micro-batch's forward, loss share and
    backward), then AdamW. bf16 autocast over fp32 adapters on a GPU, as the Trainer's --bf16 without DeepSpeed
    (DeepSpeed's bf16 casts the adapters instead)."""

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    loss = run_step(model, step, layout, forward_context=autocast)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_pass(model, layout, steps, optimizer, device, losses: list) -> float:
    """Seconds for training steps. Losses stay on the device until the end, as in the Trainer, which reads them
    only when it logs: a read every step would make the host wait for each step's last kernel."""
    synchronize(device)
    start = time.perf_counter()
    for step in steps:
        losses.append(train_step(model, layout, step, optimizer, device))
    synchronize(device)
    return time.perf_counter() - start
