"""The screening steps, one module each: a tile's cells (cells), a slide's bag (bags), its grade
and row (slides), adequacy (adequacy, squamous) and the threshold it is called at (threshold).
``smartccs.engine`` runs them over Ray Data for the batch job and the service."""
