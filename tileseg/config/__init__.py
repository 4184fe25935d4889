"""Typed pipeline configuration: schema (pydantic) and YAML loading.

See :mod:`tileseg.config.schema` for the full pipeline schema.
"""

from __future__ import annotations

from .loader import format_errors, load_pipeline, parse_pipeline, resolve_paths
from .schema import (
    EvaluateConfig,
    ExecutionConfig,
    InputConfig,
    ModelConfig,
    OutputConfig,
    PipelineConfig,
    ReferenceConfig,
    TilingConfig,
    check_scheduler,
    check_template,
)

__all__ = [
    "EvaluateConfig",
    "ExecutionConfig",
    "InputConfig",
    "ModelConfig",
    "OutputConfig",
    "PipelineConfig",
    "ReferenceConfig",
    "TilingConfig",
    "check_scheduler",
    "check_template",
    "format_errors",
    "load_pipeline",
    "parse_pipeline",
    "resolve_paths",
]
