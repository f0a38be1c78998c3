"""Mapping files: load, validate and compile them into ``connector.approvals.spec`` objects.

Typical use::

    from connector.rules import MappingSet

    mappings = MappingSet.load("mappings/")
    for spec in mappings.for_object("salesforce", "Opportunity"):
        ...
    errors = mappings.reload()  # keeps the last good set when a file is broken
"""

from connector.rules.coerce import (
    CoercionError,
    CoercionFailure,
    Duration,
    coerce,
    parse_duration,
    try_coerce,
)
from connector.rules.criteria import (
    COMBINATORS,
    OPERATORS,
    CompiledCriterion,
    compile_criterion,
    compile_when,
)
from connector.rules.errors import MappingError, MappingLoadError
from connector.rules.loader import (
    LoadedMapping,
    LoadResult,
    MappingSet,
    load_mapping_dir,
    load_mapping_file,
    load_mapping_text,
    load_mappings_detailed,
    mapping_files,
)
from connector.rules.templating import (
    TEMPLATE_VARIABLES,
    LiteralValue,
    TemplateRenderError,
    TemplateValue,
    compile_value,
)

__all__ = [
    "COMBINATORS",
    "OPERATORS",
    "TEMPLATE_VARIABLES",
    "CoercionError",
    "CoercionFailure",
    "CompiledCriterion",
    "Duration",
    "LiteralValue",
    "LoadResult",
    "LoadedMapping",
    "MappingError",
    "MappingLoadError",
    "MappingSet",
    "TemplateRenderError",
    "TemplateValue",
    "coerce",
    "compile_criterion",
    "compile_value",
    "compile_when",
    "load_mapping_dir",
    "load_mapping_file",
    "load_mapping_text",
    "load_mappings_detailed",
    "mapping_files",
    "parse_duration",
    "try_coerce",
]
