"""Admin templates -> HTML -> PDF.

Templates are files an admin edits in DOCUMENTS_TEMPLATES_DIR (templates/documents/ by
default). They run in the same bounded jinja2 sandbox as the mapping files' templates
(connector/rules/template_limits.py: time, size, loops and numbers bounded), with HTML
autoescaping on. WeasyPrint turns the HTML into a PDF; it may read stylesheets and images
from the templates folder and data: URLs only, never the network or other files.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError, TemplateNotFound, nodes

from connector.errors import FatalError
from connector.rules.template_limits import BoundedSandbox, BoundedTree, TemplateLimitError, render_budget

RENDER_SECONDS = 3.0  # a document is bigger than a field value; still bounded
SAFE_STEM = re.compile(r"[^A-Za-z0-9_.-]+")


class DocumentTemplateError(FatalError):
    """A document template is missing, broken, or went over a limit."""

    code = "document_template_error"


class DocumentTree(BoundedTree):
    """BoundedTree for HTML: the template's own text stays markup (it is the admin's HTML),
    while every value put into it is escaped."""

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        for n, child in enumerate(node.nodes):
            if isinstance(child, nodes.TemplateData):
                node.nodes[n] = nodes.MarkSafe(nodes.Const(child.data), lineno=child.lineno)
        return super().visit_Output(node)


class DocumentSandbox(BoundedSandbox):
    """The bounded sandbox for whole template files: every file it loads (includes and
    extends too) is rewritten by DocumentTree before compiling."""

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = DocumentTree().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M UTC")
    if isinstance(value, date):
        return value.isoformat()
    return "" if value is None else str(value)


@dataclass(frozen=True)
class Rendered:
    html: str
    pdf: bytes


class DocumentRenderer:
    def __init__(self, templates_dir: str | Path) -> None:
        self.templates_dir = Path(templates_dir).resolve()
        self.env = DocumentSandbox(
            loader=FileSystemLoader(str(self.templates_dir)),
            autoescape=True,
            undefined=StrictUndefined,
            finalize=lambda value: "" if value is None else value,
        )
        self.env.add_filter("when", _when)

    def render_html(self, template: str, variables: Mapping[str, Any]) -> str:
        try:
            with render_budget(RENDER_SECONDS):
                return self.env.get_template(template).render(dict(variables))
        except TemplateNotFound as exc:
            raise DocumentTemplateError(
                f"document template {exc.name!r} not found in {self.templates_dir}; add the file "
                "or correct `template:` in the mapping file (DOCUMENTS_TEMPLATES_DIR sets the folder)"
            ) from None
        except TemplateLimitError as exc:
            raise DocumentTemplateError(f"document template {template!r} went over a limit: {exc}") from None
        except TemplateError as exc:
            line = getattr(exc, "lineno", None)
            where = f" line {line}" if line else ""
            raise DocumentTemplateError(f"document template {template!r}{where}: {exc}") from None

    def render(self, template: str, variables: Mapping[str, Any]) -> Rendered:
        html = self.render_html(template, variables)
        return Rendered(html, html_to_pdf(html, self.templates_dir))


def html_to_pdf(html: str, base_dir: Path) -> bytes:
    from weasyprint import HTML  # imported on first use: it loads pango

    fetcher = _fetcher_class()(base_dir)
    pdf = HTML(string=html, base_url=f"{base_dir.as_uri()}/", url_fetcher=fetcher).write_pdf()
    return bytes(pdf)


@functools.cache
def _fetcher_class() -> type:
    from weasyprint.urls import URLFetcher

    class LocalFetcher(URLFetcher):
        """Stylesheets and images from the templates folder and data: URLs; nothing else."""

        def __init__(self, base_dir: Path) -> None:
            super().__init__(allowed_protocols={"file", "data"}, allow_redirects=False)
            self.base_dir = base_dir

        def fetch(self, url: str, headers: Any = None) -> Any:
            if url.startswith("file:"):
                path = Path(unquote(urlsplit(url).path)).resolve()
                if not path.is_relative_to(self.base_dir):
                    raise ValueError(f"{url} is outside the templates folder")
            return super().fetch(url, headers)

    return LocalFetcher


def file_name(stem: str, version: int) -> str:
    """`approval-sheet v3.pdf` with anything odd in the stem replaced."""
    clean = SAFE_STEM.sub("-", stem).strip("-.") or "document"
    return f"{clean[:120]} v{version}.pdf"
