#!/bin/sh
# InternVL3-9B (InternViT-300M-448px-V2_5 + internlm3-8b-instruct): full fine-tune of the LLM and the MLP projector, ViT frozen.
#   GPUS=8 PER_DEVICE_BATCH_SIZE=4 sh shell/internvl3.0/2nd_finetune/internvl3_9b_dynamic_res_2nd_finetune_full.sh
# Defaults: 8 GPUs, 4 per GPU, total batch 128 (gradient accumulation 4), ZeRO-1.
# Hyperparameters: the original's (shell/internvl3.0/2nd_finetune/ of OpenGVLab/InternVL).
# InternVL3-9B's LLM is InternLM3, not tested here: a folder whose tokenizer is InternLM3's (InternLM3Tokenizer)
# or whose LLM config names InternLM3ForCausalLM is stopped by the checks before torchrun, with that named.
# Environment: MODEL, META_PATH, OUTPUT_DIR, DATA_ROOT, and those of shell/launch_finetune.sh (GPUS, BATCH_SIZE,
# PER_DEVICE_BATCH_SIZE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT). Extra arguments override the flags below.
set -eu
shell_dir=$(cd "$(dirname "$0")/../.." && pwd)
export GPUS=${GPUS:-8}
export BATCH_SIZE=${BATCH_SIZE:-128}
export PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-4}
export OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_chat_v3/internvl3_9b_dynamic_res_2nd_finetune_full}
MODEL=${MODEL:-./pretrained/InternVL3-9B}
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
  --freeze_llm False \
  --freeze_mlp False \
  --freeze_backbone True \
  --vision_select_layer -1 \
  --dataloader_num_workers 4 \
  --bf16 True \
  --num_train_epochs 1 \
  --evaluation_strategy "no" \
  --save_strategy "steps" \
  --save_steps 200 \
  --save_total_limit 1 \
  --learning_rate 2e-5 \
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
