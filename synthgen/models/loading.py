"""Moved to :mod:`synthgen.loading` (a base module: encoders and models both load strictly)."""

from synthgen.loading import StrictLoadMixin, check_pipeline_folder, component_subfolder  # noqa: F401
