"""The network: neurons and their surrogate gradients, layers, the stack of layers with local readouts, and the importer of the authors' models."""
