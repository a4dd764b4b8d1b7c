"""ASGI entry point: /v1 goes to the lean gateway, everything else to Django.

/v1/organization/ (OpenAI-style usage and costs, api.organization_urls) is management, not
inference: it goes to Django.

Run with `uvicorn qwenhub.asgi:application` (several --workers in production).
"""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "qwenhub.settings")
django_application = get_asgi_application()

from proxy.gateway import Gateway  # noqa: E402  (needs Django set up first)

gateway = Gateway()

DJANGO_V1_PREFIX = "/v1/organization/"


async def application(scope, receive, send):
    kind = scope["type"]
    if kind == "http":
        path = scope["path"]
        if (path.startswith("/v1/") and not path.startswith(DJANGO_V1_PREFIX)) or path == "/v1":
            return await gateway(scope, receive, send)
        if path == "/metrics":
            return await gateway.metrics(scope, receive, send)
        return await django_application(scope, receive, send)
    if kind == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await gateway.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await gateway.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
    return await django_application(scope, receive, send)
