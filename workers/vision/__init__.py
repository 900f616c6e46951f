"""Vision backbones for image-classification tasks (CIFAR-style ResNets with pretrained weights)."""
