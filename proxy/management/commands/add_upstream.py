import os

from django.core.management.base import BaseCommand, CommandError

from proxy.services import upstream_add
from tenants.management.base import positive_int, service_errors


class Command(BaseCommand):
    help = (
        "Register a vLLM server (or replica) and the model it serves. Members call the model by its "
        "public name (listed by /v1/models) or any alias; the gateway sends vLLM its served name."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="Short identifier, e.g. gpu1.")
        parser.add_argument("base_url", metavar="BASE_URL",
                            help="As an OpenAI client would use it, e.g. http://gpu-host:8000/v1.")
        parser.add_argument("--model", required=True, dest="served_name", metavar="SERVED_NAME",
                            help="The name vLLM serves (its --served-model-name), e.g. Qwen2.5-7B-Instruct.")
        parser.add_argument("--public-name",
                            help="The name members use, e.g. qwen2.5-7b-instruct (default: SERVED_NAME). "
                                 "Naming an existing model makes this upstream a replica of it.")
        parser.add_argument("--alias", action="append", default=[], dest="aliases", metavar="NAME",
                            help="Another accepted name for the model (repeatable).")
        keys = parser.add_mutually_exclusive_group()
        keys.add_argument("--api-key", default=None,
                          help="vLLM's --api-key, sent only to the upstream (default: none).")
        keys.add_argument("--api-key-env", metavar="VARIABLE",
                          help="Read vLLM's --api-key from this environment variable of the command's own "
                               "process (e.g. VLLM_API_KEY inside the container, where .env put it).")
        parser.add_argument("--max-concurrency", type=positive_int, default=256,
                            help="vLLM's --max-num-seqs (default 256).")

    def handle(self, *args, name, base_url, served_name, public_name, aliases, api_key, api_key_env,
               max_concurrency, **options):
        api_key = _api_key(api_key, api_key_env)
        with service_errors():
            upstream = upstream_add(name=name, base_url=base_url, served_name=served_name, public_name=public_name,
                                    aliases=aliases, api_key=api_key, max_concurrency=max_concurrency)
        route = upstream.routes.select_related("model").get()
        names = sorted(route.model.aliases.values_list("alias", flat=True))
        self.stdout.write(
            f"Added upstream {upstream.name} at {upstream.base_url}: serves {route.served_name} as "
            f"{route.model.name}" + (f" (also called {', '.join(names)})" if names else "") + "."
        )
        if not upstream.base_url.endswith("/v1"):
            self.stderr.write(
                f"Note: {upstream.base_url} does not end in /v1; vLLM's OpenAI API usually lives under /v1."
            )


API_KEY_EMPTY = ("--api-key is empty. If it came from a shell variable, that variable is not set where the "
                 "command line was expanded (in docker compose, on the host): use --api-key-env VLLM_API_KEY, "
                 "or leave the option out for an upstream without a key.")
API_KEY_ENV_EMPTY = "The environment variable {name} is not set or empty in this process: no API key to read."


def _api_key(value: str | None, variable: str | None) -> str:
    """The key given, or read from an environment variable; an empty one is an error, never 'no key'."""
    if variable is not None:
        value = os.environ.get(variable, "")
        if not value.strip():
            raise CommandError(API_KEY_ENV_EMPTY.format(name=variable))
        return value.strip()
    if value is not None and not value.strip():
        raise CommandError(API_KEY_EMPTY)
    return (value or "").strip()
