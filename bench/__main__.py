"""`python -m bench [--quick] [--only SCENARIO] ...`: QwenHub vs. the upstream reached directly (see bench/README.md)."""
import sys

from bench.runner import main

sys.exit(main())
