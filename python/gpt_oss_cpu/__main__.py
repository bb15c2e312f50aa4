"""``python -m gpt_oss_cpu``: the same as the ``gpt-oss-cpu`` command."""

from gpt_oss_cpu.cli import main

raise SystemExit(main())
