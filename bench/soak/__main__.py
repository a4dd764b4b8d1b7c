"""`python -m bench.soak setup|check '<json spec>'` (bench.soak.data)."""
import sys

from bench.procs import django_json_main
from bench.soak.data import check, setup

sys.exit(django_json_main("bench.soak", sys.argv, {"setup": setup, "check": check}))
