#!/bin/sh
# InternVL2-1B (InternViT-300M + Qwen2-0.5B-Instruct): LoRA (rank 16) on the LLM, everything else frozen.
#   GPUS=2 PER_DEVICE_BATCH_SIZE=1 sh shell/internvl2.0/2nd_finetune/internvl2_1b_qwen2_0_5b_dynamic_res_2nd_finetune_lora.sh
# Defaults: 2 GPUs, 4 per GPU, total batch 16 (gradient accumulation 2), ZeRO-1.
# Hyperparameters: the original's (its OUTPUT_DIR said internvl_chat_v1_5; v2_0 here like
# its siblings).
# Environment: MODEL, META_PATH, OUTPUT_DIR, DATA_ROOT, and those of shell/launch_finetune.sh (GPUS, BATCH_SIZE,
# PER_DEVICE_BATCH_SIZE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT). Extra arguments override the flags below.
set -eu
shell_dir=$(cd "$(dirname "$0")/../.." && pwd)
export GPUS=${GPUS:-2}
export BATCH_SIZE=${BATCH_SIZE:-16}
export PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-4}
export OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_chat_v2_0/internvl2_1b_qwen2_0_5b_dynamic_res_2nd_finetune_lora}
MODEL=${MODEL:-./pretrained/InternVL2-1B}
META_PATH=${META_PATH:-./shell/data/internvl_1_2_finetune_custom.json}

exec sh "$shell_dir/launch_finetune.sh" \
  --model_name_or_path "$MODEL" \
  --conv_style "Hermes-2" \
  --meta_path "$META_PATH" \
  ${DATA_ROOT:+--data_root "$DATA_ROOT"} \
  --overwrite_output_dir True \
  --force_image_size 448 \
  --max_dynamic_patch 6 \
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
  --learning_rate 4e-5 \
  --weight_decay 0.01 \
  --warmup_ratio 0.03 \
  --lr_scheduler_type "cosine" \
  --logging_steps 1 \
  --max_seq_length 4096 \
  --do_train True \
  --grad_checkpoint True \
  --group_by_length True \
  --dynamic_image_size True \
  --use_thumbnail True \
  --ps_version 'v2' \
  --deepspeed "$shell_dir/zero_stage1_config.json" \
  --report_to "tensorboard" \
  "$@"
