"""Procedural assets of the ``street`` family: plain NumPy geometry and materials, no Blender.

Every generator takes an explicit ``numpy.random.Generator`` and the family's ``MaterialKnobs`` and returns the
``Part`` list of one object in object-local coordinates: origin at the centre of its footprint on the ground
(``z = 0`` is where it stands), its front towards ``+y``. ``scenes/street.py`` places them.
"""
