"""What only a serving replica's routes depend on, as ``Annotated`` aliases: its engine, classification pipeline,
explainer, registry follower, link to the control plane and start-up model.

Apart from ``deps.py`` (the settings, metrics, control plane and admin guard both apps use) because these import
torch, and the control plane's app, which loads no model, must start without it. ``async def`` for the reason
``deps.py`` gives.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.api.forward import ControlLink
from app.classification.classifier import Classifier
from app.classification.explanations import Explainer
from app.control.follower import RegistryFollower
from app.control.plane import InitialModel
from app.engine.engine import InferenceEngine


async def _engine(request: Request) -> InferenceEngine:
    return request.app.state.engine


async def _classifier(request: Request) -> Classifier:
    return request.app.state.classifier


async def _explainer(request: Request) -> Explainer:
    return request.app.state.explainer


async def _follower(request: Request) -> RegistryFollower:
    return request.app.state.follower


async def _control_link(request: Request) -> ControlLink:
    return request.app.state.control_link


async def _initial_model(request: Request) -> InitialModel:
    return request.app.state.initial_model


EngineDep = Annotated[InferenceEngine, Depends(_engine)]
ClassifierDep = Annotated[Classifier, Depends(_classifier)]
ExplainerDep = Annotated[Explainer, Depends(_explainer)]
FollowerDep = Annotated[RegistryFollower, Depends(_follower)]
ControlLinkDep = Annotated[ControlLink, Depends(_control_link)]
InitialModelDep = Annotated[InitialModel, Depends(_initial_model)]
