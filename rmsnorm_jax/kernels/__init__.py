"""Pallas kernels, one module per backend.

``BY_NAME`` maps each explicit ``backend=`` name to its Implementation class;
``BY_PLATFORM`` names the kernel that ``backend="pallas"`` (and ``"auto"``,
where the kernel's ``preferred_for`` agrees) uses on a lowering platform.
"""

BY_NAME: dict = {}
BY_PLATFORM: dict = {}
