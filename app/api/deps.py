"""Shared route dependencies as ``Annotated`` aliases, so endpoint signatures stay short."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.engine.engine import InferenceEngine
from app.engine.preprocessing import Preprocessor
from app.metrics import ServiceMetrics


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _engine(request: Request) -> InferenceEngine:
    return request.app.state.engine


def _preprocessor(request: Request) -> Preprocessor:
    return request.app.state.preprocessor


def _metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(_settings)]
EngineDep = Annotated[InferenceEngine, Depends(_engine)]
PreprocessorDep = Annotated[Preprocessor, Depends(_preprocessor)]
MetricsDep = Annotated[ServiceMetrics, Depends(_metrics)]
