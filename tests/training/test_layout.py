"""training/layout.py names what training writes and reads; the runs and the data loader use those names."""

from torchvision.datasets import CIFAR10

from training.layout import CHECKPOINT_DIR, CONFIG_FILE, DATA_FOLDER, METRICS_FILE, STATE_FILE


def test_the_data_folder_is_the_one_torchvision_reads():
    assert CIFAR10.base_folder == DATA_FOLDER


def test_a_run_directory_holds_the_files_named_there(trained_run):
    for name in (CONFIG_FILE, METRICS_FILE, STATE_FILE, CHECKPOINT_DIR):
        assert (trained_run / name).exists(), name
