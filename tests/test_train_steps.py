"""Step counting follows the original: whole gradient-accumulation windows only."""

import pytest
from torch.utils.data import DataLoader, Dataset
from transformers import TrainingArguments

from internvl_chat.devkit.checkpoint import tiny_config_dict
from internvl_chat.model.configuration_internvl_chat import InternVLChatConfig
from internvl_chat.model.modeling_internvl_chat import InternVLChatModel
from internvl_chat.train.trainer import InternVLTrainer


class Numbers(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return index


def trainer_for(tmp_path, **args):
    model = InternVLChatModel(InternVLChatConfig(**tiny_config_dict(vocab_size=300)))
    arguments = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **args)
    return InternVLTrainer(model=model, args=arguments, train_dataset=Numbers(10))


def test_epochs_count_whole_accumulation_windows(tmp_path):
    trainer = trainer_for(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=16, num_train_epochs=1)
    # 4 x 16 x 10 + 4 x 5 samples: 165 batches = 10 full windows and a partial one
    loader = DataLoader(Numbers(4 * 16 * 10 + 4 * 5), batch_size=4)
    values = trainer.set_initial_training_values(trainer.args, loader)
    assert values[1] == 10 and values[-1] == 10
    two_epochs = trainer_for(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=16, num_train_epochs=2
    )
    assert two_epochs.set_initial_training_values(two_epochs.args, loader)[-1] == 20


def test_explicit_max_steps_is_kept(tmp_path):
    trainer = trainer_for(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=16, max_steps=7)
    loader = DataLoader(Numbers(1000), batch_size=4)
    assert trainer.set_initial_training_values(trainer.args, loader)[-1] == 7


def test_profile_steps_reads_a_step_range_and_refuses_others():
    from internvl_chat.train.profiling import parse_step_range

    assert parse_step_range("20,22") == (20, 22) and parse_step_range("5") == (5, 5)
    for bad in ("0,2", "3,2", "a,b", "1,2,3", ""):
        with pytest.raises(ValueError, match="--profile_steps"):
            parse_step_range(bad)


def test_idle_report_finds_the_gpus_waits_and_what_the_host_did_meanwhile():
    from internvl_chat.train.profiling import Span, idle_report

    kernels = [
        Span(0, 100, "gemm"),
        Span(50, 400, "attention"),
        Span(410, 500, "norm"),  # overlap, a 10 us gap
        Span(3500, 3600, "gemm"),
        Span(4600, 4700, "adam"),
    ]  # gaps of 3.0 and 1.0 ms
    host = [
        Span(450, 3400, "aten::nonzero"),
        Span(3700, 3800, "aten::item"),
        Span(3650, 4500, "Optimizer.step", "[]"),
        Span(3640, 3645, "aten::to", "[[4, 3, 448, 448]]"),
    ]
    report = idle_report(kernels, host, steps=2, min_gap_us=200)
    lines = report.splitlines()
    assert lines[0].startswith("GPU idle in gaps of 0.2 ms or more: 2.0 ms per step (1 gaps per step)")
    assert lines[1].split() == ["3.00", "ms", "after", "norm", "before", "gemm;", "host:", "aten::nonzero"]
    assert "1.00 ms after gemm before adam; host: Optimizer.step, aten::item, aten::to[[4, 3, 448, 448]]" in lines[2]
    assert len(lines) == 3


def test_batches_cross_to_the_gpu_asynchronously_from_pinned_memory(tmp_path, monkeypatch):
    """accelerate copies batches to the device synchronously unless told otherwise: every fetch would wait for
    the GPU's queue to drain. With a GPU and pinned loader memory the Trainer asks for asynchronous copies."""
    import torch

    cpu_trainer = trainer_for(tmp_path)
    assert not cpu_trainer.accelerator.dataloader_config.non_blocking  # no GPU here: nothing to overlap
    model = InternVLChatModel(InternVLChatConfig(**tiny_config_dict(vocab_size=300)))
    arguments = TrainingArguments(output_dir=str(tmp_path), report_to=[])  # devices chosen before the patch
    unpinned = TrainingArguments(output_dir=str(tmp_path), report_to=[], dataloader_pin_memory=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert InternVLTrainer(model=model, args=arguments).accelerator.dataloader_config.non_blocking
    assert not InternVLTrainer(model=model, args=unpinned).accelerator.dataloader_config.non_blocking


def one_caption_batch():
    """A TrainingBatch of one three-token caption, for tests whose step is stood in for."""
    import torch

    from internvl_chat.data.collator import BatchCounts
    from internvl_chat.train.batch import TrainingBatch

    counts = BatchCounts(captions=1, lengths=[3], supervised=1, caption_tokens=[[1]])
    return TrainingBatch(
        input_ids=torch.zeros(1, 3, dtype=torch.long),
        pixel_values=torch.zeros(1, 3, 8, 8),
        counts=counts,
        labels=torch.zeros(1, 3, dtype=torch.long),
    )


def test_a_non_finite_loss_is_replaced_on_the_device_as_transformers_would(tmp_path, monkeypatch):
    """--logging_nan_inf_filter (on by default): a NaN or inf micro-step loss counts as the window's mean so far,
    as in transformers' loop, but decided on the device: the loop's own check, a host read of every micro-step's
    loss, is off."""
    import torch

    from internvl_chat.train import trainer as trainer_module

    trainer = trainer_for(tmp_path)
    assert trainer.filter_nan_inf_losses and not trainer.args.logging_nan_inf_filter
    losses = iter([6.0, float("nan"), float("inf"), float("nan")])
    monkeypatch.setattr(trainer_module, "backward_micro_batch", lambda *args, **kwargs: torch.tensor(next(losses)))
    trainer.state.global_step = 5
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    inputs = one_caption_batch()
    assert trainer.training_step(trainer.model, inputs).item() == 6.0  # finite: kept; the window opens at step 5
    trainer.state.global_step = 7  # two optimizer steps later, no loss logged meanwhile
    assert trainer.training_step(trainer.model, inputs).item() == 2.0  # 6 / (1 + 7 - 5)
    assert trainer.training_step(trainer.model, inputs).item() == pytest.approx(8 / 3)  # the replacement counts
    trainer.filter_nan_inf_losses = False  # --logging_nan_inf_filter False: the loss as it is
    assert torch.isnan(trainer.training_step(trainer.model, inputs))


def test_a_logged_loss_is_the_mean_of_its_steps_losses(tmp_path, monkeypatch):
    """The logged loss of a window is the mean over its optimizer steps of each step's loss (the sum of its
    micro-steps' losses), whatever transformers keeps privately; a NaN micro-step counts as the window's mean."""
    import torch
    from transformers import TrainerCallback

    from internvl_chat.train import trainer as trainer_module

    trainer = trainer_for(
        tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=4, logging_steps=2
    )
    micro_losses = iter([1.0, 2.0, 3.0, 4.0, 5.0, float("nan"), 7.0, 9.0])
    monkeypatch.setattr(
        trainer_module, "backward_micro_batch", lambda *args, **kwargs: torch.tensor(next(micro_losses))
    )
    monkeypatch.setattr(InternVLTrainer, "get_train_dataloader", lambda self: [one_caption_batch() for _ in range(8)])
    logged = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                logged.append(logs["loss"])

    trainer.add_callback(Keep())
    trainer.train()
    # steps: 1+2, 3+4 -> mean 5; 5 + NaN (replaced by the window's mean so far, 5 / 1), 7+9 -> (10 + 16) / 2 = 13
    assert logged == [5.0, 13.0]


def test_total_flos_come_from_the_flop_model(tmp_path, monkeypatch):
    """trainer_state's total_flos take each micro-step's count from the FLOP model, as training_step computed it
    from the collator's counts (transformers' estimate walks every parameter at every micro-step)."""
    import torch

    from internvl_chat.data.collator import BatchCounts
    from internvl_chat.train import trainer as trainer_module
    from internvl_chat.train.batch import TrainingBatch
    from internvl_chat.train.flops import FlopModel

    trainer = trainer_for(tmp_path)
    trainer.flop_model = FlopModel.from_config(trainer.model.config, lora_rank=8)
    monkeypatch.setattr(trainer_module, "backward_micro_batch", lambda *args, **kwargs: torch.tensor(1.0))
    inputs = TrainingBatch(
        input_ids=torch.zeros(2, 40, dtype=torch.long),
        pixel_values=torch.zeros(3, 3, 8, 8),
        counts=BatchCounts(captions=2, lengths=[40, 36], supervised=9, caption_tokens=[[5], [4]]),
        labels=torch.zeros(2, 40, dtype=torch.long),
    )
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    trainer.training_step(trainer.model, inputs)
    expected = trainer.flop_model.train_step_flops(3, [40, 36], logit_positions=80)
    assert expected > 0 and trainer.floating_point_ops(inputs) == expected


def test_busy_time_merges_overlapping_spans():
    """GPU busy time is the union of the device spans: overlapping kernels (several streams) count once."""
    from internvl_chat.train.profiling import Span, busy_time

    spans = [
        Span(0, 100, "gemm"),
        Span(50, 400, "attention"),
        Span(60, 70, "small"),
        Span(410, 500, "norm"),
        Span(3500, 3600, "gemm"),
    ]
    assert busy_time(spans) == 400 + 90 + 100
    assert busy_time([]) == 0


def test_garbage_collection_time_is_counted_while_training_and_only_then():
    """python_gc_ms / python_gc_full: the collector's time in the window, from gc's callbacks, which are registered
    for the length of train() only (a process that builds several Trainers keeps no stale callbacks)."""
    import gc

    from internvl_chat.train.trainer import GarbageCollectionTimer

    timer = GarbageCollectionTimer()
    with timer:
        assert timer in gc.callbacks
        garbage = [[] for _ in range(1000)]
        for first, second in zip(garbage, garbage[1:]):
            first.append(second), second.append(first)  # cycles: only the cyclic collector frees them
        del garbage, first, second
        gc.collect(0)
        gc.collect()
        figures = timer.take()
    assert timer not in gc.callbacks
    assert figures["python_gc_full"] >= 1 and figures["python_gc_ms"] > 0  # ours, and any the allocations set off
    assert timer.take() == {"python_gc_ms": 0.0, "python_gc_full": 0}
    gc.collect()  # outside train(): not counted
    assert timer.take() == {"python_gc_ms": 0.0, "python_gc_full": 0}


def test_objects_alive_after_the_compiling_steps_are_frozen_until_training_ends(tmp_path):
    """A full garbage collection walks every object; after the first two optimizer steps (torch.compile's graphs)
    the live ones are frozen, once, and released at the end of training."""
    import gc

    from internvl_chat.train.trainer import FreezeObjectsAfterCompiling

    trainer = trainer_for(tmp_path)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, FreezeObjectsAfterCompiling))
    assert gc.get_freeze_count() == 0
    try:
        callback.on_step_end(trainer.args, trainer.state, trainer.control)
        assert gc.get_freeze_count() == 0
        callback.on_step_end(trainer.args, trainer.state, trainer.control)
        frozen = gc.get_freeze_count()
        assert frozen > 1000
        callback.on_step_end(trainer.args, trainer.state, trainer.control)
        assert gc.get_freeze_count() == frozen  # not again
        callback.on_train_end(trainer.args, trainer.state, trainer.control)
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_flop_model_counts_the_last_layer_at_the_logit_positions_only():
    """With the last layer computed at the supervised rows (InternLM2), a 2B step's count drops by that layer's
    projections other than QKV (frozen and LoRA) at every other row: forward, activation and LoRA gradients."""
    from internvl_chat.checkpoint.presets import preset_config_dict
    from internvl_chat.model.configuration_internvl_chat import InternVLChatConfig
    from internvl_chat.train.flops import FlopModel

    config = InternVLChatConfig(**preset_config_dict("InternVL2-2B"))
    full = FlopModel.from_config(config, lora_rank=128)
    truncated = FlopModel.from_config(config, lora_rank=128, last_layer_at_logits=True)
    lengths, supervised = [1850, 1840], 30
    skipped = sum(lengths) - supervised
    # InternLM2-1.8B: hidden 2048, MLP 8192; wo and w1, w3, w2, and their r-128 adapters
    frozen = 2048 * 2048 + 3 * 2048 * 8192
    lora = 128 * ((2048 + 2048) + 2 * (2048 + 8192) + (8192 + 2048))
    expected = 2 * 2 * skipped * (frozen + lora) + 2 * skipped * lora
    assert full.llm_flops(lengths, supervised) - truncated.llm_flops(lengths, supervised) == expected
    everywhere = len(lengths) * max(lengths)  # the faithful path's logits: every position of the padded batch
    assert full.llm_flops(lengths, everywhere) == truncated.llm_flops(lengths, everywhere)
    assert 0.03 < expected / full.llm_flops(lengths, supervised) < 0.04  # about 1/24 of the LLM's work


@pytest.mark.parametrize("llm", ["internlm2", "qwen2", "phi3", "llama", "qwen3"])
def test_the_flop_model_counts_the_lora_adapters_the_model_has(llm):
    """Per token, a LoRA adapter costs r x (in + out) multiply-adds: the FLOP model's count is the adapters'
    parameter count, for fused and separate projections and for Qwen3's heads wider than its hidden size."""
    from internvl_chat.train.flops import FlopModel

    generation = "3.5" if llm == "qwen3" else "2"
    model = InternVLChatModel(InternVLChatConfig(**tiny_config_dict(llm=llm, vocab_size=300, generation=generation)))
    for parameter in model.parameters():
        parameter.requires_grad = False
    model.wrap_llm_lora(r=8, lora_alpha=16, lora_dropout=0.0)
    adapters = sum(parameter.numel() for name, parameter in model.named_parameters() if "lora_" in name)
    assert FlopModel.from_config(model.config, lora_rank=8).lora_params == adapters
