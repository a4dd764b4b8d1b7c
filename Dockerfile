# QwenHub gateway image: the web app (uvicorn), Celery worker and beat, and one-shot
# management commands all run from it. vLLM runs in its own image (vllm/vllm-openai).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code changes reuse this layer. Every pinned package ships
# manylinux wheels (psycopg[binary], uvloop, httptools, hiredis, orjson), so no compiler.
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .

# Static files (the Django admin's CSS/JS) are collected at build time. No DATABASE_URL
# here, so settings load in embedded mode and need no secret; nothing touches a database.
RUN python manage.py collectstatic --noinput \
    && useradd --system --uid 1000 --home-dir /app qwenhub \
    && chown -R qwenhub /app/staticfiles

USER qwenhub
EXPOSE 8000

CMD ["uvicorn", "qwenhub.asgi:application", "--workers", "4", "--host", "0.0.0.0", "--port", "8000", \
     "--loop", "uvloop", "--http", "httptools"]
