"""Shared route dependencies as ``Annotated`` aliases, so endpoint signatures stay short.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, which on the
hot path costs a thread hop per dependency per request for what is an attribute lookup.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.classification.classifier import Classifier
from app.config import Settings
from app.engine.engine import InferenceEngine
from app.metrics import ServiceMetrics


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _engine(request: Request) -> InferenceEngine:
    return request.app.state.engine


async def _classifier(request: Request) -> Classifier:
    return request.app.state.classifier


async def _metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(_settings)]
EngineDep = Annotated[InferenceEngine, Depends(_engine)]
ClassifierDep = Annotated[Classifier, Depends(_classifier)]
MetricsDep = Annotated[ServiceMetrics, Depends(_metrics)]
