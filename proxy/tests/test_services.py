"""Upstream and catalogue services: audited, the upstream's api_key never in the audit trail."""
import json

import pytest
from django.core.exceptions import ValidationError

from proxy.models import ModelAlias, ModelRoute, PublicModel, Upstream
from proxy.services import (
    RowChanges,
    model_alias_create,
    model_alias_delete,
    model_alias_update,
    model_route_create,
    model_route_delete,
    model_route_update,
    public_model_create,
    public_model_delete,
    public_model_update,
    upstream_create,
    upstream_delete,
    upstream_update,
)
from tenants.models import AuditEvent
from tenants.services import member_update
from tenants.tests.factories import MemberFactory, ModelRouteFactory, PublicModelFactory, UpstreamFactory
from tenants.tests.utils import tables_containing

pytestmark = pytest.mark.django_db
Kind = AuditEvent.Kind


def events(kind):
    return list(AuditEvent.objects.filter(kind=kind).order_by("pk"))


# --- Upstreams ---------------------------------------------------------------------------------

def test_upstream_update_records_changes_and_only_that_the_api_key_changed(admin_user):
    upstream = UpstreamFactory(name="gpu1", api_key="old-secret-value", max_concurrency=64)
    upstream = upstream_update(upstream=upstream, data={"name": "gpu1", "api_key": "new-secret-value",
                                                        "max_concurrency": 32, "base_url": "http://gpu9:8000/v1/"},
                               actor=admin_user)
    assert (upstream.api_key, upstream.max_concurrency, upstream.base_url) == (
        "new-secret-value", 32, "http://gpu9:8000/v1")
    [event] = events(Kind.UPSTREAM_UPDATED)
    assert event.actor == admin_user and event.subject_id == upstream.pk
    assert event.data["changed"]["api_key"] == "api_key changed"
    assert event.data["changed"]["max_concurrency"] == {"old": 64, "new": 32}
    text = json.dumps(event.data) + event.reason
    assert "secret-value" not in text
    for secret in ("old-secret-value", "new-secret-value"):
        assert "tenants_auditevent" not in tables_containing(secret)
    upstream_update(upstream=upstream, data={"api_key": "", "enabled": False})
    assert events(Kind.UPSTREAM_UPDATED)[-1].data["changed"] == {
        "api_key": "api_key changed", "enabled": {"old": True, "new": False}}


def test_upstream_update_that_changes_nothing_writes_nothing_and_bad_values_are_refused():
    upstream = UpstreamFactory(api_key="k", max_concurrency=8)
    upstream_update(upstream=upstream, data={"api_key": "k", "max_concurrency": 8})
    for data in ({"max_concurrency": 0}, {"base_url": "ftp://x/v1"}, {"name": "has space"}):
        with pytest.raises(ValidationError):
            upstream_update(upstream=upstream, data=data)
    upstream.refresh_from_db()
    assert upstream.max_concurrency == 8 and not events(Kind.UPSTREAM_UPDATED)


def test_upstream_create_and_delete(admin_user):
    upstream = upstream_create(name="gpu2", base_url="http://gpu2:8000/v1", api_key="s3cr3t-k3y", actor=admin_user)
    route = ModelRouteFactory(upstream=upstream)
    [added] = events(Kind.UPSTREAM_ADDED)
    assert added.data["api_key"] == "set" and "s3cr3t" not in json.dumps(added.data)
    upstream_delete(upstream=upstream, actor=admin_user)
    assert not Upstream.objects.exists() and not ModelRoute.objects.filter(pk=route.pk).exists()
    [deleted] = events(Kind.UPSTREAM_DELETED)
    assert deleted.data["name"] == "gpu2" and deleted.data["routes"] == ["qwen2.5-7b-instruct → Qwen2.5-7B-Instruct"]
    with pytest.raises(ValidationError):
        upstream_create(name="gpu3", base_url="not a url")


# --- Public models, routes, aliases ---------------------------------------------------------------

def test_public_model_create_with_routes_and_aliases(admin_user):
    upstream = UpstreamFactory(name="gpu1")
    model = public_model_create(name="chat", routes=[{"upstream": upstream, "served_name": "Qwen"}],
                                aliases=["fast"], actor=admin_user)
    assert ModelRoute.objects.get(model=model).served_name == "Qwen"
    assert list(model.aliases.values_list("alias", flat=True)) == ["fast"]
    assert [len(events(k)) for k in (Kind.MODEL_ADDED, Kind.ROUTE_ADDED, Kind.ALIAS_ADDED)] == [1, 1, 1]
    assert all(e.actor == admin_user for e in AuditEvent.objects.all())


def test_names_are_unique_across_models_and_aliases():
    model = public_model_create(name="chat", aliases=["fast"])
    other = PublicModelFactory(name="code")
    with pytest.raises(ValidationError, match="already belongs to model 'chat'"):
        model_alias_create(model=other, alias="fast")
    with pytest.raises(ValidationError, match="already belongs to model 'code'"):
        model_alias_create(model=model, alias="code")
    with pytest.raises(ValidationError, match="already an alias of model 'chat'"):
        public_model_create(name="fast")
    with pytest.raises(ValidationError, match="already an alias"):
        public_model_update(model=other, data={"name": "fast"})
    assert ModelAlias.objects.count() == 1 and PublicModel.objects.count() == 2


def test_public_model_update_with_its_rows_is_one_transaction():
    model = public_model_create(name="chat", aliases=["fast", "quick"])
    PublicModelFactory(name="code")
    fast, quick = model.aliases.order_by("alias")
    # renaming the model to an alias it drops, and adding a taken name: all refused together
    with pytest.raises(ValidationError):
        public_model_update(model=model, data={"name": "fast", "max_model_len": 8192},
                            aliases=RowChanges(add=[{"alias": "code"}], delete=[fast]))
    model.refresh_from_db()
    assert (model.name, model.max_model_len) == ("chat", 32768) and model.aliases.count() == 2
    public_model_update(model=model, data={"name": "fast"}, aliases=RowChanges(
        add=[{"alias": "chat"}], change=[(quick, {"alias": "swift"})], delete=[fast]))
    model.refresh_from_db()
    assert model.name == "fast"
    assert sorted(model.aliases.values_list("alias", flat=True)) == ["chat", "swift"]
    [updated] = events(Kind.MODEL_UPDATED)
    assert updated.data == {"name": "fast", "changed": {"name": {"old": "chat", "new": "fast"}}}
    assert [len(events(k)) for k in (Kind.ALIAS_DELETED, Kind.ALIAS_UPDATED)] == [1, 1]


def test_public_model_delete_is_refused_while_a_member_may_use_only_it(admin_user):
    model = public_model_create(name="chat", aliases=["fast"])
    member = MemberFactory()
    member_update(member=member, data={"allowed_models": [model]})
    with pytest.raises(ValidationError, match="allowed models of 1 member"):
        public_model_delete(model=model)
    member_update(member=member, data={"allowed_models": []})
    public_model_delete(model=model, actor=admin_user)
    assert not PublicModel.objects.exists() and not ModelAlias.objects.exists()
    assert events(Kind.MODEL_DELETED)[0].data == {"name": "chat", "aliases": ["fast"], "routes": []}


def test_route_and_alias_services(admin_user):
    model, other = PublicModelFactory(name="chat"), PublicModelFactory(name="code")
    gpu1, gpu2 = UpstreamFactory(name="gpu1"), UpstreamFactory(name="gpu2")
    route = model_route_create(model=model, upstream=gpu1, served_name="Qwen", actor=admin_user)
    model_route_create(model=model, upstream=gpu2, served_name="Qwen")
    with pytest.raises(ValidationError):
        model_route_update(route=route, data={"upstream": gpu2})  # one route per (model, upstream)
    route = model_route_update(route=route, data={"served_name": "Qwen2", "upstream": gpu1})
    assert events(Kind.ROUTE_UPDATED)[0].data["changed"] == {"served_name": {"old": "Qwen", "new": "Qwen2"}}
    model_route_delete(route=route)
    assert list(ModelRoute.objects.values_list("upstream__name", flat=True)) == ["gpu2"]

    alias = model_alias_create(model=model, alias="fast")
    alias = model_alias_update(alias=alias, data={"model": other})
    assert events(Kind.ALIAS_UPDATED)[0].data["changed"] == {"model": {"old": "chat", "new": "code"}}
    model_alias_delete(alias=alias)
    assert not ModelAlias.objects.exists()
    assert [len(events(k)) for k in (Kind.ROUTE_ADDED, Kind.ROUTE_DELETED, Kind.ALIAS_ADDED,
                                     Kind.ALIAS_DELETED)] == [2, 1, 1, 1]
