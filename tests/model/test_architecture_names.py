from model import architecture_names, architectures


def test_the_names_are_those_of_the_builders_in_the_same_order():
    assert architecture_names.ARCHITECTURES == architectures.ARCHITECTURES
    assert architecture_names.DEFAULT_ARCHITECTURE == architectures.DEFAULT_ARCHITECTURE
