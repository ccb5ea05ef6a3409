"""The specs drawn offline with vl-convert: SVG files (DVC image plots, the README) and a page that
inlines vega's own scripts (vl_convert.javascript_bundle) and draws every chart in the browser.
No request leaves the page: the data are in the specs, the scripts and styles in the page."""

from __future__ import annotations

import functools
import html
import json
from typing import Any


def to_svg(spec: dict[str, Any]) -> str:
    import vl_convert

    return vl_convert.vegalite_to_svg(spec)


@functools.cache  # seconds to bundle; the page and DVC's template share it
def script_bundle() -> str:
    """Vega, Vega-Lite and Vega-Embed as one script that sets window.vegaEmbed (bundled by
    vl-convert from the versions it ships, not copied into the project)."""
    import vl_convert

    bundle = vl_convert.javascript_bundle()
    return bundle.replace("</script", "<\\/script")  # inside <script>, only this ends it early


def _json_in_script(obj: Any) -> str:
    return json.dumps(obj).replace("</", "<\\/")


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1250px; color: #222; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
.banner { background: #fff3cd; border: 1px solid #e0c36b; padding: .6em .9em; border-radius: 4px; }
.missing { background: #f8d7da; border: 1px solid #e3a1a8; padding: .5em .9em; border-radius: 4px; }
table.params { border-collapse: collapse; } table.params td { border-bottom: 1px solid #eee; padding: .2em .8em .2em 0; }
table.params td:first-child { font-family: monospace; color: #555; }
.chart { margin: 1em 0; overflow-x: auto; }
"""

# Each div.chart gets its spec from the JSON script beside it; a chart that fails says why on the page.
DRAW = """
for (const el of document.querySelectorAll('div.chart')) {
  const spec = JSON.parse(document.getElementById(el.dataset.spec).textContent);
  vegaEmbed(el, spec, {renderer: 'svg', actions: false})
    .then(() => el.setAttribute('data-drawn', 'true'))
    .catch(err => { el.textContent = 'this chart failed to draw: ' + err; el.className = 'missing'; });
}
"""


def page(title: str, banner: str | None, sections: list[tuple[str, list[Any]]]) -> str:
    """A self-contained HTML page. Each section is (heading, items); an item is a spec (dict, drawn as
    a chart), a note (str, shown as a warning) or a table ([(key, value), ...])."""
    body, specs = [f"<h1>{html.escape(title)}</h1>"], []
    if banner:
        body.append(f'<p class="banner" id="banner">{html.escape(banner)}</p>')
    for heading, items in sections:
        body.append(f"<section><h2>{html.escape(heading)}</h2>")
        for item in items:
            if isinstance(item, dict):
                name = f"spec-{len(specs)}"
                specs.append(f'<script type="application/json" id="{name}">{_json_in_script(item)}</script>')
                body.append(f'<div class="chart" data-spec="{name}"></div>')
            elif isinstance(item, str):
                body.append(f'<p class="missing">{html.escape(item)}</p>')
            else:
                rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in item)
                body.append(f'<table class="params">{rows}</table>')
        body.append("</section>")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style>", f"<script>{script_bundle()}</script>" if specs else "", "</head><body>", *body, *specs,
        f"<script>{DRAW}</script>" if specs else "", "</body></html>", ""])


# DVC's `--html-template`: DVC puts its plots at {plot_divs} (each calls vegaEmbed) and CDN script
# tags at {scripts}; leaving {scripts} out and inlining the bundle instead draws them offline.
DVC_TEMPLATE = """<!DOCTYPE html>
<html><head><meta charset="utf-8">{refresh_tag}<title>DVC plots (offline)</title>
<style>table { border-spacing: 15px; } body { font-family: system-ui, sans-serif; }</style>
<script>BUNDLE</script>
</head><body>
{plot_divs}
</body></html>
"""


def dvc_template() -> str:
    return DVC_TEMPLATE.replace("BUNDLE", script_bundle())
