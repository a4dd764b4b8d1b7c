"""The OpenAI-compatible /v1 gateway: a lean ASGI app in front of vLLM.

qwenhub.asgi sends every /v1 request here; everything else goes to Django.
The request path (shared/DESIGN.md): authenticate (cached) → validate → route →
reserve quota (1 statement) → forward on a pooled keep-alive connection, streaming
bytes as they arrive → settle (1 statement), whatever happened. Nothing on this
path goes through Django's middleware or its sync machinery.
"""
from proxy.gateway.app import Gateway

__all__ = ["Gateway"]
