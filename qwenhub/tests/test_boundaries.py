"""Which part of QwenHub may import which: an AST walk over the shipped code's imports.

The parts (tests and migrations are not walked; the benchmark is not shipped):

    qwenhub        the project: settings, URLs, the ASGI entry point, project-wide commands
    tenants        teams, members, keys, quotas (the rule in tenants.quota)
    billing        usage rows, billing periods, invoices, money
    proxy          the catalog: upstreams, public models, routes, aliases
    proxy.gateway  the request path
    proxy.simulator  the vLLM stand-in (no Django)
    dashboards     the members' and team admins' pages
    api            the management REST API

The rules: only the ASGI entry point imports the gateway; the gateway imports no
`services` or `admin` module (rules reach it as SQL text and plain code); tenants imports
neither billing nor the gateway; the simulator imports no Django and nothing of QwenHub;
the pages and the API sit on top (no app below imports them); and no two apps import each
other, directly or around a circle.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("qwenhub", "tenants", "billing", "proxy", "dashboards", "api")
APPS = ("tenants", "billing", "proxy", "proxy.gateway", "proxy.simulator", "dashboards", "api")
GATEWAY_ENTRY = "qwenhub.asgi"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _shipped_files():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).parts
            if "tests" in rel or "migrations" in rel:
                continue
            yield path


def _imports(path: Path) -> set[str]:
    """Every module path a file imports, at the top or inside functions (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from proxy.gateway import errors` imports the module proxy.gateway.errors
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _app_of(module: str) -> str | None:
    """The most specific app a module belongs to (proxy.gateway.app → proxy.gateway)."""
    owners = [app for app in APPS if module == app or module.startswith(app + ".")]
    return max(owners, key=len) if owners else None


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """module → the QwenHub modules it imports."""
    return {
        _module_name(path): {m for m in _imports(path) if m.split(".")[0] in PACKAGES}
        for path in _shipped_files()
    }


def _violations(graph, importer_filter, imported_filter) -> list[str]:
    return sorted(f"{src} imports {dst}" for src, targets in graph.items() if importer_filter(src)
                  for dst in targets if imported_filter(dst))


def test_the_walk_sees_the_code(graph):
    # A walk that found nothing would pass every rule below.
    assert "qwenhub.asgi" in graph and "proxy.gateway.app" in graph and "tenants.services" in graph
    assert "proxy.gateway" in graph[GATEWAY_ENTRY]
    assert any(_is_under(m, "tenants.quota") for m in graph["proxy.gateway.app"]) or any(
        any(_is_under(m, "tenants.quota") for m in targets)
        for src, targets in graph.items() if _is_under(src, "proxy.gateway"))


def test_only_the_asgi_entry_point_imports_the_gateway(graph):
    assert _violations(
        graph,
        lambda src: src != GATEWAY_ENTRY and not _is_under(src, "proxy.gateway"),
        lambda dst: _is_under(dst, "proxy.gateway"),
    ) == []


def test_the_gateway_imports_no_services_or_admin(graph):
    assert _violations(
        graph,
        lambda src: _is_under(src, "proxy.gateway"),
        lambda dst: any(part in ("services", "admin", "selectors", "views") for part in dst.split(".")),
    ) == []


def test_tenants_imports_neither_billing_nor_the_gateway(graph):
    assert _violations(
        graph,
        lambda src: _is_under(src, "tenants"),
        lambda dst: _is_under(dst, "billing") or _is_under(dst, "proxy.gateway"),
    ) == []


def test_nothing_below_imports_the_pages_or_the_api(graph):
    assert _violations(
        graph,
        lambda src: _app_of(src) in ("tenants", "billing", "proxy", "proxy.gateway"),
        lambda dst: _is_under(dst, "dashboards") or _is_under(dst, "api"),
    ) == []


def test_the_simulator_imports_no_django_and_nothing_of_qwenhub():
    offending = []
    for path in sorted((ROOT / "proxy" / "simulator").rglob("*.py")):
        if "tests" in path.relative_to(ROOT).parts:
            continue
        for module in _imports(path):
            top = module.split(".")[0]
            if top in ("django", "rest_framework", "celery") or (
                    top in PACKAGES and not _is_under(module, "proxy.simulator") and module != "proxy"):
                offending.append(f"{_module_name(path)} imports {module}")
    assert offending == []


def _app_graph(graph) -> dict[str, set[str]]:
    apps: dict[str, set[str]] = {app: set() for app in APPS}
    for src, targets in graph.items():
        src_app = _app_of(src)
        if src_app is None:
            continue
        for dst in targets:
            dst_app = _app_of(dst)
            # `import proxy.gateway.x` also names the package `proxy`: only the module counts.
            if dst_app and dst_app != src_app and not (dst in APPS and _is_under(src, dst)):
                apps[src_app].add(dst_app)
    return apps


def _cycle(apps: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(app):
        state[app] = "open"
        path.append(app)
        for nxt in sorted(apps[app]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[app] = "done"
        path.pop()
        return None

    for app in sorted(apps):
        if app not in state and (found := visit(app)):
            return found
    return None


def test_no_import_cycle_between_apps(graph):
    assert _cycle(_app_graph(graph)) is None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
