from model.labels import CIFAR10_MEAN, CIFAR10_STD, CLASS_NAMES


def test_class_names_are_in_cifar10_label_order():
    assert CLASS_NAMES == ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def test_normalisation_constants_are_per_channel_on_the_unit_scale():
    assert len(CIFAR10_MEAN) == len(CIFAR10_STD) == 3
    assert all(0.4 < m < 0.5 for m in CIFAR10_MEAN) and all(0.2 < s < 0.3 for s in CIFAR10_STD)
