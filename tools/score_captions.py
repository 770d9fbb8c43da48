#!/usr/bin/env python3
"""`python tools/score_captions.py ...`, as the tutorial types it: the `internvl-score-captions` command
(internvl_chat/cli/score_captions.py), which `pip install -e .` (tools/setup_env.sh) makes importable."""

from internvl_chat.cli.score_captions import main

if __name__ == "__main__":
    main()
