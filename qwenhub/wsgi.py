"""WSGI entry point (management tools only; QwenHub is served over ASGI)."""
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "qwenhub.settings")
application = get_wsgi_application()
