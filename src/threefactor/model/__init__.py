"""The network: the spike and its surrogate gradients (``surrogates``), neurons as step
functions (``neurons``), layers and their step contract (``layers``), the stack of layers with
local readouts (``network``), its initialisation (``init``), and the importer of the authors'
models (``decolle_public``)."""
