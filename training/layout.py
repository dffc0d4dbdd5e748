"""Where training's files are: the data set's folder inside ``--data-dir``, and what a run directory holds.

The service's job runner follows a run directory while training writes it, so both take the names from here
(this module imports nothing, so the service can)::

    RUN/config.json           the resolved configuration, the git commit and the machine (training.config)
    RUN/metrics.jsonl         one JSON event per line: start, epoch, resumed, interrupted, final (training.metrics)
    RUN/state.pt              what --resume continues from, every --checkpoint-every epochs (training.state)
    RUN/checkpoint/           the model, model.safetensors + card.json (model.checkpoint)
    RUN/train.log             stdout and stderr of a run the service's job runner started
    RUN/curves.png, RUN/confusion_matrix.png, RUN/test_predictions.png   with --plots (training.plots)
    RUN/reliability.png       with --plots and --holdout: raw and temperature-scaled calibration (training.trust)
"""

DATA_FOLDER = "cifar-10-batches-py"  # inside --data-dir: the official archive's folder (torchvision's base_folder)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.pt"
CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "train.log"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion_matrix.png"
PREDICTIONS_FILE = "test_predictions.png"
RELIABILITY_FILE = "reliability.png"
