from django.urls import path

from dashboards.member import views

app_name = "member"
urlpatterns = [
    path("", views.member_home, name="home"),
    path("keys/", views.api_key_list, name="keys"),
    path("keys/new/", views.api_key_create, name="key_create"),
    path("keys/<int:key_id>/revoke/", views.api_key_revoke_view, name="key_revoke"),
    path("requests/", views.usage_list, name="requests"),
    path("requests.csv", views.usage_csv, name="requests_csv"),
    path("invoices/", views.invoice_list, name="invoices"),
    path("invoices/<int:invoice_id>/", views.invoice_statement, name="invoice"),
    path("switch-team/", views.team_switch, name="switch_team"),
]
