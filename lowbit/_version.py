"""The library's version, in a leaf module: the modules that record it (manifests, export
provenance) read it here rather than from the package root, which sits above every layer
(docs/DESIGN.md, "Layers")."""

__version__ = "0.1.0"
