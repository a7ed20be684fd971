"""The SYNTHETIC multi-center cohort generator behind ``ccs synth`` (see docs/synth.md).

``profiles`` (center profiles and their YAML schema), ``specimen`` (cells in microns),
``render`` (pixels from cells), ``cohort`` (slides, manifests and ground truth on disk),
``writer`` (pyramidal TIFF/SVS files), ``gallery`` (a contact sheet of every class).
"""
