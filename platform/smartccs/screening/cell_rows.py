"""The cell stream's rows, named once: what the scorer actors write (``screening.cells``) and
the bag collector reads (``screening.bags``).

Each tile gives its kept cells' rows (an abnormal class, a score, a level-0 box, an embedding),
then one summary row (``class_index = TILE_ROW``) carrying the tile's status, squamous count,
QC and compute time. The slide and tile columns keep the names the tile stream gave them
(``data.tiles``).
"""

TILE_ROW = -1
"""``class_index`` of a tile's summary row."""

CENTER, BATCH, SLIDE_ID = "center", "batch", "slide_id"
TILE_INDEX, N_TILES = "tile_index", "n_tiles"
CLASS_INDEX, SCORE, BOX = "class_index", "score", "box"
STATUS, ERROR = "status", "error"
N_SQUAMOUS = "n_squamous"
"""On a summary row: normal squamous nuclei counted on the tile (``screening.squamous``)."""
SLIDE_MPP, BACKGROUND, BLUR, SLIDE_AREA = (
    "slide_mpp", "background_fraction", "blur", "slide_area_mm2",
)  # fmt: skip
EMBEDDING = "embedding"
AUG_EMBEDDING = "embedding_aug"
"""With ``views=2``: each cell's embedding under a random flip and 90° rotation of its crop,
the augmented view test-time adaptation contrasts with (zeros on summary rows)."""
SECONDS = "seconds"
"""On a summary row: the tile's share of the actor's time on its batch (read, detect, crop,
embed). Summed per slide it is the compute the slide cost, which a streaming pipeline cannot
give as a wall time."""

SLIDE_COLUMNS = (CENTER, BATCH, SLIDE_ID, N_TILES)
QC_COLUMNS = (SLIDE_MPP, BACKGROUND, BLUR, SLIDE_AREA)
"""Copied from the tile row onto its summary row only (NaN on cell rows, and where a tile row
lacks one)."""
ROW_COLUMNS = (
    *SLIDE_COLUMNS, TILE_INDEX, CLASS_INDEX, SCORE, BOX, STATUS, ERROR, N_SQUAMOUS, *QC_COLUMNS,
)  # fmt: skip
"""Every column but the embeddings and ``SECONDS``, which the scorer adds as arrays."""
