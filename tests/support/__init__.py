"""What several test modules share, in one place: the checkout's root, checkpoints, image files, a synthetic
CIFAR-10, free ports, waiting on conditions with deadlines, the service in-process or as a live server, and
the training-job API's tiny settings. Fixtures stay in the conftest.py files; these are plain imports."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
