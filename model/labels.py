"""Class names and input normalisation: the one place both training and serving read them from."""

CLASS_NAMES: tuple[str, ...] = (
    "plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
NUM_CLASSES = len(CLASS_NAMES)
TEST_IMAGES = 10_000  # the official test set; an accuracy on fewer images is a smoke figure, not comparable

INPUT_SIZE = 32

# Per-channel statistics of the CIFAR-10 training set (RGB, on the 0..1 scale), as published with the
# dataset and matched by the copy in ../shared/cifar10 to within 0.05 (its README, check 5).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
