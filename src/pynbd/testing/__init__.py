"""Test support for pynbd: a qemu guest with a real nbd driver (:mod:`pynbd.testing.vm`).

Nothing here is imported by the rest of pynbd. The submodule is not imported by this
package, so that ``python -m pynbd.testing.vm`` runs it cleanly.
"""

from __future__ import annotations
