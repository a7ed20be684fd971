"""Smart-CCS: cervical cancer screening from cytology whole-slide images, on Ray."""

__version__ = "0.1.0"
