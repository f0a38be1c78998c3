"""One rule set for several CRMs: a mapping file with `connections:` maps the same business
object on each connection (its object name and field map there) and shares one set of roles,
groups and rules. Loading it yields one compiled mapping per connection, each compiled and
checked against its own field map, so the pipeline and `validate` see ordinary mappings.

Errors point at the connection's own keys (``connections.hubspot.fields.amount``); a problem
in the shared rules that only one connection's field map causes names that connection.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from connector.rules.errors import ErrorCollector, KeyPath, MappingError, MappingLoadError
from connector.rules.schema import MappingFileModel, SharedMappingFileModel, validate_shared_document

if TYPE_CHECKING:
    from connector.rules.loader import LoadedMapping

# Keys of a single-connection file that a shared file keeps per connection.
PER_CONNECTION = ("fields", "object", "connection")


class _ConnectionErrors(ErrorCollector):
    """Errors of one connection's compilation, at the connection's own keys where they are."""

    def __init__(
        self, file: str, lines: Mapping[KeyPath, int], connection: str, own: frozenset[KeyPath]
    ) -> None:
        super().__init__(file, lines)
        self.connection = connection
        self.own = own  # ("roles", name) / ("groups", name) this connection overrides

    def add(self, path: KeyPath, message: str, hint: str | None = None) -> None:
        if path and path[0] in PER_CONNECTION:
            path = ("connections", self.connection, *path[1:]) if path[0] == "connection" else path
            path = path if path[0] == "connections" else ("connections", self.connection, *path)
        elif path[:2] in self.own:
            path = ("connections", self.connection, *path)
        super().add(path, message, hint)


def load_shared(
    document: Any, lines: Mapping[KeyPath, int], file: str, content_hash: str
) -> list[LoadedMapping]:
    """Every connection's compiled mapping, or MappingLoadError with every problem found."""
    from connector.rules.loader import LoadedMapping, _SpecBuilder

    errors = ErrorCollector(file, lines)
    model = validate_shared_document(document, errors)
    if model is None:
        raise MappingLoadError(sorted(errors.errors, key=lambda e: e.line))
    loaded: list[LoadedMapping] = []
    found: list[tuple[str, MappingError]] = []
    for name, side in model.connections.items():
        own = frozenset({("roles", r) for r in side.roles} | {("groups", g) for g in side.groups})
        collector = _ConnectionErrors(file, lines, name, own)
        spec = _SpecBuilder(_single(model, name), collector).build(file, content_hash)
        found += [(name, error) for error in collector.errors]
        if spec is not None:
            loaded.append(LoadedMapping(spec, lines, prefix=("connections", name)))
    if found:
        raise MappingLoadError(sorted(_merge(found, len(model.connections)), key=lambda e: e.line))
    return loaded


def _single(model: SharedMappingFileModel, name: str) -> MappingFileModel:
    side = model.connections[name]
    # Parts already validated: constructed, not validated again (user ids are tuples by now).
    return MappingFileModel.model_construct(
        connection=name,
        object_type=side.object_type,
        description=model.description,
        match=model.match,
        fields=side.fields,
        roles={**model.roles, **side.roles},
        groups={**model.groups, **side.groups},
        rules=model.rules,
    )


def _merge(found: list[tuple[str, MappingError]], connections: int) -> list[MappingError]:
    """A shared-rule problem every connection has is said once; one that only some have
    (an undeclared field in one field map) says which connection."""
    counts = Counter(error for _, error in found)
    merged: list[MappingError] = []
    seen: set[MappingError] = set()
    for name, error in found:
        if error.key.startswith("connections.") or counts[error] == connections:
            if error not in seen:
                seen.add(error)
                merged.append(error)
            continue
        message = f"{error.message} (in connection `{name}`'s field map)"
        merged.append(MappingError(error.file, error.line, error.key, message, error.hint, error.column))
    return merged
