from django.core.management.base import BaseCommand

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
        parser.add_argument("--api-key", default="",
                            help="vLLM's --api-key, sent only to the upstream (default: none).")
        parser.add_argument("--max-concurrency", type=positive_int, default=256,
                            help="vLLM's --max-num-seqs (default 256).")

    def handle(self, *args, name, base_url, served_name, public_name, aliases, api_key, max_concurrency, **options):
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
