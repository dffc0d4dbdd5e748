"""What the network is: the ResNet family, class names and normalisation, and the checkpoint format."""
