"""The management REST API under /api/v1/ and its OpenAPI schema under /api/schema/ (docs: /api/docs/).

Every route's view declares `access` (member, team_admin, organization_admin): the
permission-matrix test iterates over these patterns and needs a case for each.
"""
from datetime import date

from django.urls import include, path, re_path, register_converter
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from api.apis import me, teams
from api.apis.common import FIRST_DAY, LAST_DAY
from api.errors import NotFoundApi

app_name = "api"


class MonthConverter:
    regex = r"\d{4}-(?:0[1-9]|1[0-2])"

    def to_python(self, value: str) -> date:
        month = date.fromisoformat(value + "-01")
        if not FIRST_DAY <= month <= LAST_DAY:  # year 1 or 9999 would overflow in a team's time zone
            raise ValueError(value)  # no match: the API's 404
        return month

    def to_url(self, value) -> str:
        return value if isinstance(value, str) else f"{value:%Y-%m}"


register_converter(MonthConverter, "month")

me_patterns = [
    path("", me.ProfileDetailApi.as_view(), name="me"),
    path("keys/", me.ApiKeyListApi.as_view(), name="me-keys"),
    path("keys/create/", me.ApiKeyCreateApi.as_view(), name="me-key-create"),
    path("keys/<int:key_id>/revoke/", me.ApiKeyRevokeApi.as_view(), name="me-key-revoke"),
    path("usage/", me.UsageListApi.as_view(), name="me-usage"),
    path("usage/daily/", me.UsageDailyApi.as_view(), name="me-usage-daily"),
    path("invoices/", me.InvoiceListApi.as_view(), name="me-invoices"),
    path("invoices/<int:invoice_id>/", me.InvoiceDetailApi.as_view(), name="me-invoice"),
]

team_patterns = [
    path("members/", teams.MemberListApi.as_view(), name="team-members"),
    path("members/invite/", teams.MemberInviteApi.as_view(), name="team-member-invite"),
    path("members/<int:member_id>/", teams.MemberDetailApi.as_view(), name="team-member"),
    path("members/<int:member_id>/update/", teams.MemberUpdateApi.as_view(), name="team-member-update"),
    path("members/<int:member_id>/suspend/", teams.MemberSuspendApi.as_view(), name="team-member-suspend"),
    path("members/<int:member_id>/invitation/", teams.MemberInvitationApi.as_view(), name="team-member-invitation"),
    path("members/<int:member_id>/reactivate/", teams.MemberReactivateApi.as_view(),
         name="team-member-reactivate"),
    path("usage/daily/", teams.TeamUsageDailyApi.as_view(), name="team-usage-daily"),
    path("periods/", teams.PeriodListApi.as_view(), name="team-periods"),
    path("periods/<month:month>/close/", teams.PeriodCloseApi.as_view(), name="team-period-close"),
    path("periods/<month:month>/finalize/", teams.PeriodFinalizeApi.as_view(), name="team-period-finalize"),
    path("periods/<month:month>/actual-cost/", teams.PeriodSetActualCostApi.as_view(),
         name="team-period-actual-cost"),
    path("invoices/", teams.TeamInvoiceListApi.as_view(), name="team-invoices"),
    path("invoices/<int:invoice_id>/", teams.TeamInvoiceDetailApi.as_view(), name="team-invoice"),
    path("audit-events/", teams.AuditEventListApi.as_view(), name="team-audit-events"),
    path("upstreams/", teams.UpstreamListApi.as_view(), name="team-upstreams"),
]

urlpatterns = [
    path("v1/me/", include(me_patterns)),
    path("v1/teams/<slug:slug>/", include(team_patterns)),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
    re_path(r"", NotFoundApi.as_view(), name="not-found"),  # the API's 404s have its error shape too
]
