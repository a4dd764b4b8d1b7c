from django.contrib import admin
from django.urls import include, path

admin.site.site_header = "QwenHub administration"
admin.site.site_title = "QwenHub"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("dashboards.accounts.urls")),
    path("i18n/", include("django.conf.urls.i18n")),
    path("api/", include("api.urls")),
    # OpenAI-style usage and costs: qwenhub.asgi routes /v1/organization/ here, not to the gateway.
    path("v1/organization/", include("api.organization_urls")),
    path("team/", include("dashboards.team.urls")),
    path("", include("dashboards.member.urls")),
]
