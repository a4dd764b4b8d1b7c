"""`python -m bench.soak setup|check '<json spec>'` (bench.soak.data)."""
import json
import sys

from bench.soak.data import _check_main, _setup_main

commands = {"setup": _setup_main, "check": _check_main}
if len(sys.argv) != 3 or sys.argv[1] not in commands:
    sys.exit("usage: python -m bench.soak setup|check '<json spec>'")
print(json.dumps(commands[sys.argv[1]](json.loads(sys.argv[2])), default=str))
