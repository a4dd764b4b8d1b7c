"""The Django admin: teams with members inline, keys without hashes, revocation through the service."""
import pytest
from django.contrib import admin
from django.contrib.admin.models import CHANGE, LogEntry
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from proxy.models import Upstream
from tenants.models import ApiKey, AuditEvent, Member
from tenants.tests.factories import (
    ApiKeyFactory,
    MemberFactory,
    ModelRouteFactory,
    QuotaCounterFactory,
    TeamFactory,
    UpstreamFactory,
    UsageRecordFactory,
)

pytestmark = pytest.mark.django_db


def form_data(response) -> dict:
    """Return the POST data a browser would send back for an admin change page, unchanged."""
    data = {}
    forms = [response.context["adminform"].form]
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        forms += list(formset.forms)
        for name, field in formset.management_form.fields.items():
            data[formset.management_form.add_prefix(name)] = formset.management_form[name].value()
    for form in forms:
        for name in form.fields:
            value = form[name].value()
            if value is None or value is False:
                continue
            data[form.add_prefix(name)] = value
    return data


# --- Team and members ------------------------------------------------------------

def test_team_change_page_shows_members_inline_with_their_quotas(admin_client):
    team = TeamFactory()
    MemberFactory(team=team, user__username="alice", request_quota=1234)
    MemberFactory(team=team, user__username="bob")
    response = admin_client.get(reverse("admin:tenants_team_change", args=[team.pk]))
    assert response.status_code == 200
    content = response.content.decode()
    assert "alice" in content and "bob" in content
    assert 'name="members-0-request_quota"' in content and 'value="1234"' in content


def test_quota_edited_on_the_team_page_is_saved_and_logged(admin_client, admin_user):
    team = TeamFactory()
    alice = MemberFactory(team=team, user__username="alice", request_quota=100)
    url = reverse("admin:tenants_team_change", args=[team.pk])
    data = form_data(admin_client.get(url))
    data["members-0-request_quota"] = "250"
    data["members-0-tokens_per_minute"] = "9000"
    response = admin_client.post(url, data)
    assert response.status_code == 302, response.context and response.context.get("errors")
    alice.refresh_from_db()
    assert (alice.request_quota, alice.tokens_per_minute) == (250, 9000)
    entry = LogEntry.objects.get(object_id=str(team.pk), action_flag=CHANGE)
    assert entry.user == admin_user and "request_quota" in entry.change_message.lower().replace(" ", "_")


def test_negative_quota_on_the_team_page_is_refused(admin_client):
    team = TeamFactory()
    alice = MemberFactory(team=team, request_quota=100)
    url = reverse("admin:tenants_team_change", args=[team.pk])
    data = form_data(admin_client.get(url))
    data["members-0-request_quota"] = "-1"
    response = admin_client.post(url, data)
    assert response.status_code == 200  # the form again, with the error
    alice.refresh_from_db()
    assert alice.request_quota == 100 and not LogEntry.objects.exists()


# --- API keys ----------------------------------------------------------------------

def test_key_hashes_are_never_shown(admin_client):
    keys = ApiKeyFactory.create_batch(3)
    pages = [admin_client.get(reverse("admin:tenants_apikey_changelist")),
             admin_client.get(reverse("admin:tenants_apikey_change", args=[keys[0].pk])),
             admin_client.get(reverse("admin:tenants_member_change", args=[keys[0].member_id]))]
    for response in pages:
        assert response.status_code == 200
        content = response.content.decode()
        assert "sha256$" not in content
        for key in keys:
            assert key.key_hash.split("$")[1] not in content and key.raw not in content
    assert keys[0].prefix in pages[0].content.decode()


def test_searching_by_hash_finds_nothing_but_the_prefix_finds_the_key(admin_client):
    key = ApiKeyFactory()
    url = reverse("admin:tenants_apikey_changelist")
    assert admin_client.get(url, {"q": key.key_hash}).context["cl"].result_count == 0
    assert admin_client.get(url, {"q": key.key_hash.split("$")[1]}).context["cl"].result_count == 0
    assert admin_client.get(url, {"q": key.prefix}).context["cl"].result_count == 1


@pytest.mark.parametrize(
    "url_name, lookup",
    [
        ("admin:tenants_apikey_changelist", "key_hash"),
        ("admin:tenants_apikey_changelist", "key_hash__startswith"),
        ("admin:tenants_member_changelist", "api_keys__key_hash"),
        ("admin:tenants_team_changelist", "members__api_keys__key_hash"),
        ("admin:billing_usagerecord_changelist", "api_key__key_hash"),
        ("admin:tenants_member_changelist", "user__password__startswith"),
    ],
)
def test_lookups_on_secrets_are_refused(admin_client, url_name, lookup):
    key = ApiKeyFactory()
    UsageRecordFactory(member=key.member, api_key=key)
    response = admin_client.get(reverse(url_name), {lookup: key.key_hash[:20]})
    assert response.status_code == 400


def test_revoke_action_revokes_through_the_service_and_logs(admin_client, admin_user):
    keys = ApiKeyFactory.create_batch(2)
    untouched = ApiKeyFactory()
    response = admin_client.post(reverse("admin:tenants_apikey_changelist"),
                                 {"action": "revoke_selected", "_selected_action": [k.pk for k in keys]})
    assert response.status_code == 302
    assert ApiKey.objects.filter(revoked_at__isnull=False).count() == 2
    assert ApiKey.objects.get(pk=untouched.pk).revoked_at is None
    entries = LogEntry.objects.filter(action_flag=CHANGE, user=admin_user)
    assert sorted(int(e.object_id) for e in entries) == sorted(k.pk for k in keys)
    assert all("Revoked" in e.get_change_message() for e in entries)
    events = AuditEvent.objects.filter(kind=AuditEvent.Kind.KEY_REVOKED)
    assert events.count() == 2 and {e.actor for e in events} == {admin_user}


def test_revoking_an_already_revoked_key_warns_and_logs_nothing_more(admin_client):
    key = ApiKeyFactory()
    url = reverse("admin:tenants_apikey_changelist")
    admin_client.post(url, {"action": "revoke_selected", "_selected_action": [key.pk]})
    response = admin_client.post(url, {"action": "revoke_selected", "_selected_action": [key.pk]}, follow=True)
    assert "already revoked" in response.content.decode()
    assert LogEntry.objects.count() == 1 and AuditEvent.objects.count() == 1


def test_keys_cannot_be_added_or_deleted_in_the_admin(admin_client):
    key = ApiKeyFactory()
    assert admin_client.get(reverse("admin:tenants_apikey_add")).status_code == 403
    assert admin_client.post(reverse("admin:tenants_apikey_delete", args=[key.pk]), {"post": "yes"}).status_code == 403
    assert ApiKey.objects.filter(pk=key.pk).exists()


def test_audit_events_are_read_only(admin_client):
    member = MemberFactory()
    event = AuditEvent.objects.create(kind=AuditEvent.Kind.MEMBER_ADDED, team=member.team, member=member)
    assert admin_client.get(reverse("admin:tenants_auditevent_add")).status_code == 403
    change_url = reverse("admin:tenants_auditevent_change", args=[event.pk])
    assert admin_client.get(change_url).status_code == 200  # view only
    assert admin_client.post(change_url, {"reason": "edited"}).status_code == 403
    assert admin_client.post(reverse("admin:tenants_auditevent_delete", args=[event.pk]),
                             {"post": "yes"}).status_code == 403
    event.refresh_from_db()
    assert event.reason == ""


# --- Upstreams ------------------------------------------------------------------------

def test_upstream_api_key_is_masked_in_lists_and_never_rendered(admin_client):
    upstream = UpstreamFactory(api_key="vllm-very-secret")
    for url in [reverse("admin:proxy_upstream_changelist"), reverse("admin:proxy_upstream_change", args=[upstream.pk])]:
        response = admin_client.get(url)
        assert response.status_code == 200 and "vllm-very-secret" not in response.content.decode()
    assert "••••" in admin_client.get(reverse("admin:proxy_upstream_changelist")).content.decode()


def test_upstream_saved_without_retyping_the_key_keeps_it(admin_client):
    upstream = UpstreamFactory(api_key="vllm-very-secret", max_concurrency=64)
    url = reverse("admin:proxy_upstream_change", args=[upstream.pk])
    data = form_data(admin_client.get(url))
    data["max_concurrency"] = "32"
    assert admin_client.post(url, data).status_code == 302
    upstream.refresh_from_db()
    assert (upstream.api_key, upstream.max_concurrency) == ("vllm-very-secret", 32)
    assert "api" not in LogEntry.objects.get().get_change_message().lower()
    data["api_key"] = "rotated-key"
    admin_client.post(url, data)
    assert Upstream.objects.get(pk=upstream.pk).api_key == "rotated-key"
    data["api_key"], data["clear_api_key"] = "", "on"
    admin_client.post(url, data)
    assert Upstream.objects.get(pk=upstream.pk).api_key == ""


def test_upstream_lookup_on_the_api_key_is_refused(admin_client):
    UpstreamFactory(api_key="vllm-very-secret")
    response = admin_client.get(reverse("admin:proxy_upstream_changelist"), {"api_key__startswith": "vllm"})
    assert response.status_code == 400


# --- Every changelist ----------------------------------------------------------------

def seed(n: int) -> None:
    for _ in range(n):
        key = ApiKeyFactory()
        QuotaCounterFactory(member=key.member)
        UsageRecordFactory(member=key.member, api_key=key)
        AuditEvent.objects.create(kind=AuditEvent.Kind.KEY_ISSUED, team=key.member.team, member=key.member,
                                  actor=key.member.user)
        ModelRouteFactory(model__name=f"model-{key.pk}")


def test_every_changelist_renders_with_queries_independent_of_row_count(admin_client):
    """list_select_related everywhere: 8 rows cost no more queries than 2."""
    models = [m for m in admin.site._registry if m._meta.app_label in {"tenants", "proxy", "billing"}]
    assert {m.__name__ for m in models} >= {"Team", "Member", "ApiKey", "AuditEvent", "Upstream", "PublicModel",
                                            "ModelRoute", "ModelAlias", "QuotaCounter", "UsageRecord"}

    def query_counts() -> dict:
        counts = {}
        for model in models:
            url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
            with CaptureQueriesContext(connection) as queries:
                assert admin_client.get(url).status_code == 200, url
            counts[model.__name__] = len(queries)
        return counts

    seed(2)
    few = query_counts()
    seed(6)
    assert query_counts() == few


def test_member_change_page_renders(admin_client):
    member = MemberFactory()
    response = admin_client.get(reverse("admin:tenants_member_change", args=[member.pk]))
    assert response.status_code == 200 and Member.objects.count() == 1
