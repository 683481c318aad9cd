"""Workflows: what a command or a recipe step does, as a function of one typed job object.

The CLI (``synthgen tile``, ``synthgen cache``, ...) parses options into a job and prints the
result; a recipe step builds the same job from its YAML section. Neither holds the logic, so the
two never drift apart (a recipe's tiling checks duplicate slide keys exactly as the command does).

- :mod:`~synthgen.workflows.tile`: slides -> tile table (:class:`TileJob`, :func:`tile`);
- :mod:`~synthgen.workflows.cache`: tiles or images -> feature cache (:class:`CacheJob`, :func:`cache`);
- :mod:`~synthgen.workflows.datasets`: an image set from a tile table, a generate output or a folder;
- :mod:`~synthgen.workflows.audit`: the memorisation audit of a generate output against training data;
- :mod:`~synthgen.workflows.masks`: condition masks (nuclei pseudo-labels, procedural, augmented,
  a recipe's ``paired:`` set) and the mask-adherence evaluation;
- :mod:`~synthgen.workflows.evaluate`: fidelity, the utility study and the combined report.
"""
