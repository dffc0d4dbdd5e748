"""How the network learns: `python -m training` trains a ResNet on CIFAR-10 and writes a run directory.

Single GPU (or CPU, slowly):
    python -m training --data-dir data --run-dir runs/r50

Several GPUs on one machine (the global batch is split across them):
    torchrun --standalone --nproc-per-node 8 -m training --data-dir data --run-dir runs/r50

docs/training.md gives the recipe, why its defaults are what they are, and what a run writes.
"""
