#!/bin/sh
# InternVL3.5-1B (InternViT-300M-448px-V2_5 + Qwen3-0.6B): LoRA (rank 16 on the LLM), ViT and MLP frozen.
#   GPUS=2 PER_DEVICE_BATCH_SIZE=4 sh shell/internvl3.5/2nd_finetune/internvl3_5_1b_dynamic_res_2nd_finetune_lora.sh
# Defaults: 2 GPUs, 4 per GPU, total batch 16 (gradient accumulation 2), ZeRO-1.
# The original has no LoRA fine-tune of InternVL3.5 (its 3.5 code lost LoRA; --use_llm_lora fails there):
# this is the recipe of InternVL3's LoRA launchers (rank 16 on the LLM's q/k/v/o and gate/up/down
# projections, 12 tiles, 16384 tokens, LLM and MLP frozen, batch 16 on 2 GPUs).
# Environment: MODEL, META_PATH, OUTPUT_DIR, DATA_ROOT, and those of shell/launch_finetune.sh (GPUS, BATCH_SIZE,
# PER_DEVICE_BATCH_SIZE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT). Extra arguments override the flags below.
set -eu
shell_dir=$(cd "$(dirname "$0")/../.." && pwd)
export GPUS=${GPUS:-2}
export BATCH_SIZE=${BATCH_SIZE:-16}
export PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-4}
export OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_chat_v3_5/internvl3_5_1b_dynamic_res_2nd_finetune_lora}
MODEL=${MODEL:-./pretrained/InternVL3_5-1B}
META_PATH=${META_PATH:-./shell/data/internvl_1_2_finetune_custom.json}

exec sh "$shell_dir/launch_finetune.sh" \
  --model_name_or_path "$MODEL" \
  --conv_style "internvl2_5" \
  --use_fast_tokenizer False \
  --meta_path "$META_PATH" \
  ${DATA_ROOT:+--data_root "$DATA_ROOT"} \
  --overwrite_output_dir True \
  --force_image_size 448 \
  --max_dynamic_patch 12 \
  --down_sample_ratio 0.5 \
  --drop_path_rate 0.0 \
  --freeze_llm True \
  --freeze_mlp True \
  --freeze_backbone True \
  --use_llm_lora 16 \
  --vision_select_layer -1 \
  --dataloader_num_workers 4 \
  --bf16 True \
  --num_train_epochs 1 \
  --evaluation_strategy "no" \
  --save_strategy "steps" \
  --save_steps 200 \
  --save_total_limit 1 \
  --learning_rate 1e-5 \
  --weight_decay 0.05 \
  --warmup_ratio 0.03 \
  --lr_scheduler_type "cosine" \
  --logging_steps 1 \
  --max_seq_length 16384 \
  --do_train True \
  --grad_checkpoint True \
  --group_by_length True \
  --dynamic_image_size True \
  --use_thumbnail True \
  --ps_version 'v2' \
  --deepspeed "$shell_dir/zero_stage1_config.json" \
  --report_to "tensorboard" \
  "$@"
