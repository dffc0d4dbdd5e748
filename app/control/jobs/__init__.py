"""Training jobs: what the API shows of them (schemas), their records (store), their processes (runner,
processes) and what a run has done so far (progress). Nothing here knows of the registry or promotion: the
runner hands a finished run's checkpoint to a success handler (``ModelPromoter.register_run``)."""
