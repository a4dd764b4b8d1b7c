"""A vLLM OpenAI-compatible server simulator (no GPU, no weights, no Django).

Run: ``python -m proxy.simulator --port 8001 --model Qwen2.5-7B-Instruct [options]``.
In tests: ``from proxy.simulator.testing import start_simulator``. Token rule and
accounting: ``proxy/simulator/tokens.py`` and ``engine.py`` docstrings, and README.md.
"""
from .tokens import chat_prompt_tokens, completion_prompt_tokens, count_text_tokens

__all__ = ["count_text_tokens", "chat_prompt_tokens", "completion_prompt_tokens"]
