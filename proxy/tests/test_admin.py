"""The upstream and catalogue admin pages save and delete through proxy.services."""
import json

import pytest
from django.contrib.admin.models import ADDITION, DELETION, LogEntry
from django.urls import reverse

from proxy.models import ModelAlias, ModelRoute, PublicModel, Upstream
from tenants.models import AuditEvent
from tenants.services import member_update
from tenants.tests.factories import MemberFactory, ModelRouteFactory, PublicModelFactory, UpstreamFactory
from tenants.tests.test_admin import form_data

pytestmark = pytest.mark.django_db
Kind = AuditEvent.Kind


def test_upstream_key_rotated_in_the_admin_is_audited_without_its_value(admin_client, admin_user):
    upstream = UpstreamFactory(api_key="vllm-very-secret", max_concurrency=64)
    url = reverse("admin:proxy_upstream_change", args=[upstream.pk])
    data = form_data(admin_client.get(url))
    data["max_concurrency"] = "32"
    assert admin_client.post(url, data).status_code == 302
    data["api_key"] = "rotated-secret"
    assert admin_client.post(url, data).status_code == 302
    first, second = AuditEvent.objects.filter(kind=Kind.UPSTREAM_UPDATED).order_by("pk")
    assert first.data["changed"] == {"max_concurrency": {"old": 64, "new": 32}}
    assert second.data["changed"] == {"api_key": "api_key changed"} and second.actor == admin_user
    assert "secret" not in json.dumps([first.data, second.data])


def test_upstream_added_and_deleted_in_the_admin(admin_client, admin_user):
    response = admin_client.post(reverse("admin:proxy_upstream_add"), {
        "name": "gpu7", "base_url": "http://gpu7:8000/v1", "api_key": "k-123", "enabled": "on",
        "max_concurrency": "16"})
    assert response.status_code == 302, response.context and response.context["errors"]
    upstream = Upstream.objects.get(name="gpu7")
    assert upstream.api_key == "k-123"
    assert AuditEvent.objects.get(kind=Kind.UPSTREAM_ADDED).actor == admin_user
    ModelRouteFactory(upstream=upstream)
    response = admin_client.post(reverse("admin:proxy_upstream_delete", args=[upstream.pk]), {"post": "yes"})
    assert response.status_code == 302
    assert not Upstream.objects.exists() and not ModelRoute.objects.exists()
    assert AuditEvent.objects.get(kind=Kind.UPSTREAM_DELETED).data["name"] == "gpu7"
    assert LogEntry.objects.get(action_flag=DELETION).object_id == str(upstream.pk)


def test_public_model_page_saves_model_routes_and_aliases_in_one_step(admin_client):
    route = ModelRouteFactory(model__name="chat")
    model = route.model
    ModelAlias.objects.create(alias="fast", model=model)
    spare = UpstreamFactory(name="spare")
    url = reverse("admin:proxy_publicmodel_change", args=[model.pk])
    data = form_data(admin_client.get(url))
    data.update({
        "max_model_len": "8192",
        "routes-0-served_name": "Qwen-new",
        "routes-TOTAL_FORMS": "2", "routes-1-upstream": str(spare.pk), "routes-1-served_name": "Qwen",
        "aliases-0-DELETE": "on",
        "aliases-TOTAL_FORMS": "2", "aliases-1-alias": "quick",
    })
    response = admin_client.post(url, data)
    assert response.status_code == 302, response.context and response.context["errors"]
    model.refresh_from_db()
    assert model.max_model_len == 8192
    assert sorted(ModelRoute.objects.values_list("served_name", flat=True)) == ["Qwen", "Qwen-new"]
    assert list(model.aliases.values_list("alias", flat=True)) == ["quick"]
    kinds = sorted(AuditEvent.objects.values_list("kind", flat=True))
    assert kinds == sorted([Kind.MODEL_UPDATED, Kind.ROUTE_UPDATED, Kind.ROUTE_ADDED, Kind.ALIAS_DELETED,
                            Kind.ALIAS_ADDED])
    message = LogEntry.objects.get().get_change_message()
    assert "quick" in message and "fast" in message


def test_a_refused_inline_alias_is_a_form_error_and_nothing_is_saved(admin_client):
    model = PublicModelFactory(name="chat")
    PublicModelFactory(name="code")
    url = reverse("admin:proxy_publicmodel_change", args=[model.pk])
    data = form_data(admin_client.get(url))
    data.update({"max_model_len": "8192", "aliases-TOTAL_FORMS": "1", "aliases-0-alias": "code"})
    response = admin_client.post(url, data)
    assert response.status_code == 200
    assert "already belongs to model" in response.content.decode()
    model.refresh_from_db()
    assert model.max_model_len == 32768 and not ModelAlias.objects.exists()
    assert not AuditEvent.objects.exists() and not LogEntry.objects.exists()


def test_public_model_added_with_an_alias(admin_client, admin_user):
    response = admin_client.post(reverse("admin:proxy_publicmodel_add"), {
        "name": "chat", "default_max_tokens": "1024", "max_model_len": "4096",
        "routes-TOTAL_FORMS": "0", "routes-INITIAL_FORMS": "0",
        "aliases-TOTAL_FORMS": "1", "aliases-INITIAL_FORMS": "0", "aliases-0-alias": "fast",
    })
    assert response.status_code == 302, response.context and response.context["errors"]
    model = PublicModel.objects.get(name="chat")
    assert list(model.aliases.values_list("alias", flat=True)) == ["fast"]
    assert set(AuditEvent.objects.values_list("kind", flat=True)) == {Kind.MODEL_ADDED, Kind.ALIAS_ADDED}
    assert LogEntry.objects.get(action_flag=ADDITION).object_id == str(model.pk)


def test_a_refused_delete_is_an_error_message_and_nothing_is_logged(admin_client):
    model = PublicModelFactory(name="chat")
    member_update(member=MemberFactory(), data={"allowed_models": [model]})
    response = admin_client.post(reverse("admin:proxy_publicmodel_delete", args=[model.pk]), {"post": "yes"},
                                 follow=True)
    assert "allowed models of 1 member" in response.content.decode()
    assert PublicModel.objects.filter(pk=model.pk).exists()
    assert not LogEntry.objects.exists() and not AuditEvent.objects.filter(kind=Kind.MODEL_DELETED).exists()


def test_alias_page_errors_and_bulk_delete(admin_client, admin_user):
    model = PublicModelFactory(name="chat")
    response = admin_client.post(reverse("admin:proxy_modelalias_add"), {"alias": "chat", "model": str(model.pk)})
    assert response.status_code == 200 and "already belongs to model" in response.content.decode()
    for alias in ("fast", "quick"):
        response = admin_client.post(reverse("admin:proxy_modelalias_add"), {"alias": alias, "model": str(model.pk)})
        assert response.status_code == 302
    response = admin_client.post(reverse("admin:proxy_modelalias_changelist"), {
        "action": "delete_selected", "post": "yes",
        "_selected_action": list(ModelAlias.objects.values_list("pk", flat=True))})
    assert response.status_code == 302 and not ModelAlias.objects.exists()
    assert AuditEvent.objects.filter(kind=Kind.ALIAS_DELETED, actor=admin_user).count() == 2
    assert LogEntry.objects.filter(action_flag=DELETION).count() == 2


def test_route_page_saves_through_the_services(admin_client, admin_user):
    route = ModelRouteFactory(served_name="Qwen")
    url = reverse("admin:proxy_modelroute_change", args=[route.pk])
    data = form_data(admin_client.get(url))
    data["served_name"] = "Qwen2"
    assert admin_client.post(url, data).status_code == 302
    event = AuditEvent.objects.get(kind=Kind.ROUTE_UPDATED)
    assert event.actor == admin_user and event.data["changed"] == {"served_name": {"old": "Qwen", "new": "Qwen2"}}
