"""OpenAI-style organization usage and costs, mounted at /v1/organization/ (qwenhub.asgi sends them to Django)."""
from django.urls import path, re_path

from api.apis import organization
from api.errors import NotFoundApi

app_name = "organization"

urlpatterns = [
    path("usage/completions", organization.OrganizationUsageCompletionsApi.as_view(), name="usage-completions"),
    path("costs", organization.OrganizationCostsApi.as_view(), name="costs"),
    re_path(r"", NotFoundApi.as_view(), name="not-found"),
]
