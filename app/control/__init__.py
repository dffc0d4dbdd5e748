"""The control plane: training jobs, the model registry and promotion, beside the data plane that serves.

The imports go one way::

    plane ──┬──> promotion ──┬──> registry ──> model.card
            │                v       ^
            ├──────────────> jobs  (schemas, store, runner, processes, progress)
            │                ^       |
            └──> retention ──┴───────┘

``jobs`` knows nothing of the registry or of promotion: its runner hands a finished run's checkpoint to a
success handler, ``ModelPromoter.register_run``, which registers it and serves it by policy. ``plane``
builds them all for one lifespan of the app (and reads the registry itself to pick the model to start with).
"""
