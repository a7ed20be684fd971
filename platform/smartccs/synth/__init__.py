"""The SYNTHETIC multi-center cohort generator behind ``ccs synth`` (see docs/synth.md).

Centers: ``profiles`` (center profiles and their YAML schema).
Cells in microns: ``cell_table`` (the table's layout), ``morphology`` (Bethesda parameter
ranges), ``cell_drawing`` (cells from those ranges), ``contour`` and ``cell_geometry``
(outlines, boxes, areas), ``prep_area`` and ``placement`` (where cells go), ``grid_index``
(region queries), ``specimen`` (one slide's scene).
Pixels and files: ``render`` (optics, sensor and the region loop), ``cell_painting`` (one
cell's stain), ``texture`` (grain in microns), ``scan`` (a specimen into a pyramid file),
``writer`` (pyramidal TIFF/SVS files), ``gallery`` (a contact sheet of every class).
The cohort on disk: ``cohort`` (the entry point), ``cohort_plan`` (centers, grades, seeds),
``slide_job`` (one slide), ``worker_pool`` (many in parallel), ``ground_truth`` (table
schemas), ``center_output`` (a center's folder and manifest), ``cohort_summary`` (what was
written), ``atomic_write`` (whole files or none).
"""
