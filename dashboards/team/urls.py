from django.urls import path

from dashboards.team import views

app_name = "team"
urlpatterns = [
    path("", views.team_home, name="home"),
    path("export.csv", views.month_export, name="export"),
    path("members/<int:member_id>/", views.member_detail, name="member"),
    path("members/<int:member_id>/limits/", views.member_limits_update, name="member_limits"),
    path("members/<int:member_id>/suspend/", views.member_suspend, name="member_suspend"),
    path("members/<int:member_id>/reactivate/", views.member_reactivate, name="member_reactivate"),
    path("members/<int:member_id>/invite/", views.member_invite_again, name="member_invite"),
    path("keys/<int:key_id>/revoke/", views.key_revoke, name="key_revoke"),
    path("periods/", views.period_list, name="periods"),
    path("periods/close/", views.period_close, name="period_close"),
    path("periods/<int:period_id>/", views.period_detail, name="period"),
    path("periods/<int:period_id>/actual-cost/", views.period_actual_cost, name="period_actual_cost"),
    path("periods/<int:period_id>/finalize/", views.period_finalize, name="period_finalize"),
]
