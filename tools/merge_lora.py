#!/usr/bin/env python3
"""`python tools/merge_lora.py ...`, as the tutorial types it: the `internvl-merge-lora` command
(internvl_chat/cli/merge_lora.py), which `pip install -e .` (tools/setup_env.sh) makes importable."""

from internvl_chat.cli.merge_lora import main

if __name__ == "__main__":
    main()
