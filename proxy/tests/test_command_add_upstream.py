"""add_upstream (proxy/management/commands): an upstream, its model name and aliases."""
import pytest
from django.core.management import CommandError

from proxy.models import ModelAlias, ModelRoute, PublicModel, Upstream
from tenants.models import AuditEvent
from tenants.tests.utils import run_command

pytestmark = pytest.mark.django_db


def test_add_upstream_with_public_name_aliases_and_key():
    out, err = run_command("add_upstream", "gpu1", "http://gpu-host:8000/v1/", "--model", "Qwen2.5-7B-Instruct",
                           "--public-name", "qwen2.5-7b-instruct", "--alias", "qwen", "--alias", "gpt-4o-mini",
                           "--api-key", "vllm-secret", "--max-concurrency", "64")
    upstream = Upstream.objects.get(name="gpu1")
    assert (upstream.base_url, upstream.api_key, upstream.max_concurrency) == (
        "http://gpu-host:8000/v1", "vllm-secret", 64)
    route = ModelRoute.objects.select_related("model").get(upstream=upstream)
    assert (route.served_name, route.model.name) == ("Qwen2.5-7B-Instruct", "qwen2.5-7b-instruct")
    assert set(ModelAlias.objects.values_list("alias", flat=True)) == {"qwen", "gpt-4o-mini"}
    assert "vllm-secret" not in out and "vllm-secret" not in err and err == ""
    assert AuditEvent.objects.filter(kind=AuditEvent.Kind.UPSTREAM_ADDED, subject_id=upstream.pk).exists()


def test_a_second_upstream_for_the_same_model_is_a_replica():
    run_command("add_upstream", "gpu1", "http://vllm:8000/v1", "--model", "Qwen2.5-7B-Instruct",
                "--public-name", "qwen2.5-7b-instruct")
    run_command("add_upstream", "gpu2", "http://vllm-2:8000/v1", "--model", "Qwen2.5-7B-Instruct",
                "--public-name", "qwen2.5-7b-instruct")
    assert PublicModel.objects.count() == 1 and ModelRoute.objects.count() == 2


def test_base_url_without_v1_is_accepted_with_a_note():
    _, err = run_command("add_upstream", "gpu1", "http://gpu-host:8000", "--model", "m")
    assert "/v1" in err and Upstream.objects.filter(name="gpu1").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["gpu1", "ftp://gpu-host/v1", "--model", "m"], "base URL"),
        (["gpu1", "gpu-host:8000/v1", "--model", "m"], "base URL"),
        (["gpu1", "http://gpu host:8000/v1", "--model", "m"], "base URL"),
        (["gpu1", "http://gpu-host:99999/v1", "--model", "m"], "base URL"),
        (["gpu 1", "http://gpu-host:8000/v1", "--model", "m"], "name"),
        (["gpu1", "http://gpu-host:8000/v1"], "--model"),
        (["gpu1", "http://gpu-host:8000/v1", "--model", "m", "--max-concurrency", "0"], "at least 1"),
    ],
)
def test_add_upstream_bad_input_writes_nothing(args, message):
    with pytest.raises(CommandError, match=message):
        run_command("add_upstream", *args)
    assert not Upstream.objects.exists() and not PublicModel.objects.exists()


def test_add_upstream_duplicate_name_and_taken_alias():
    run_command("add_upstream", "gpu1", "http://gpu-host:8000/v1", "--model", "a", "--alias", "fast")
    with pytest.raises(CommandError, match="already exists"):
        run_command("add_upstream", "gpu1", "http://other:8000/v1", "--model", "b")
    with pytest.raises(CommandError, match="already belongs to model 'a'"):
        run_command("add_upstream", "gpu2", "http://other:8000/v1", "--model", "b", "--alias", "fast")
    # the refused second upstream left nothing behind
    assert list(Upstream.objects.values_list("name", flat=True)) == ["gpu1"]
    assert list(PublicModel.objects.values_list("name", flat=True)) == ["a"]


def test_an_empty_api_key_is_refused_not_taken_as_none():
    """`--api-key "$VLLM_API_KEY"` expanded from nothing on the host must not register a keyless upstream."""
    with pytest.raises(CommandError, match="--api-key is empty"):
        run_command("add_upstream", "gpu1", "http://vllm:8000/v1", "--model", "m", "--api-key", "")
    assert not Upstream.objects.exists()


def test_the_api_key_can_come_from_the_processes_environment(monkeypatch):
    monkeypatch.setenv("QH_TEST_VLLM_KEY", "s3cret-from-env")
    run_command("add_upstream", "gpu1", "http://vllm:8000/v1", "--model", "m", "--api-key-env", "QH_TEST_VLLM_KEY")
    assert Upstream.objects.get().api_key == "s3cret-from-env"
    monkeypatch.delenv("QH_TEST_VLLM_KEY")
    with pytest.raises(CommandError, match="QH_TEST_VLLM_KEY is not set"):
        run_command("add_upstream", "gpu2", "http://vllm:8000/v1", "--model", "m", "--api-key-env", "QH_TEST_VLLM_KEY")
    assert Upstream.objects.count() == 1
