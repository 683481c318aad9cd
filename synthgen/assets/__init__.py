"""Sample data shipped with synthgen (see ATTRIBUTION.md)."""

from pathlib import Path

SAMPLE_SLIDE = Path(__file__).with_name("CMU-1-Small-Region.svs")
