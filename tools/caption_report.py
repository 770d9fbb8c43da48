#!/usr/bin/env python3
"""`python tools/caption_report.py ...`, as the tutorial types it: the `internvl-caption-report` command
(internvl_chat/cli/caption_report.py), which `pip install -e .` (tools/setup_env.sh) makes importable."""

from internvl_chat.cli.caption_report import main

if __name__ == "__main__":
    main()
