"""Real reflectance spectra for synthetic cubes: the ECOSTRESS and RELAB library samples shipped with the
`spectral` package (a red maple leaf, a lichen, construction concrete, and a RELAB mineral), read through
spectral's own library importers and resampled to any band wavelengths.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile

import numpy as np


@functools.lru_cache(maxsize=1)
def _library() -> tuple[tuple[str, np.ndarray, np.ndarray], ...]:
    """(name, wavelengths nm, reflectance in [0, 1]) of every sample, imported once per process."""
    import logging

    import spectral
    from spectral.database import EcostressDatabase, RelabDatabase

    logging.getLogger("spectral").setLevel(logging.WARNING)  # the importers log every file
    base = os.path.join(os.path.dirname(spectral.__file__), "tests", "data")
    out = []
    with tempfile.TemporaryDirectory(prefix="dchag-spectra-") as tmp:
        eco = EcostressDatabase.create(os.path.join(tmp, "ecostress.db"), os.path.join(base, "ecostress"))
        for sample_id, name in eco.query("SELECT SampleID, Name FROM Samples").fetchall():
            (spectrum_id,) = eco.query("SELECT SpectrumID FROM Spectra WHERE SampleID = ?", (sample_id,)).fetchone()
            x, y = eco.get_spectrum(spectrum_id)  # micrometres, percent
            out.append((" ".join(name.split()), np.asarray(x) * 1000.0, np.asarray(y) / 100.0))
        with contextlib.redirect_stdout(io.StringIO()):  # the RELAB importer prints its progress
            relab = RelabDatabase.create(os.path.join(tmp, "relab.db"), os.path.join(base, "relab"))
        for (spectrum_id,) in relab.query("SELECT SpectrumID FROM Spectra").fetchall():
            x, y = relab.get_spectrum(spectrum_id)  # nanometres, reflectance
            out.append((f"RELAB spectrum {spectrum_id}", np.asarray(x), np.asarray(y)))
        eco.db.close()
        relab.db.close()
    return tuple(out)


def library_spectra(wavelengths_nm) -> tuple[list[str], np.ndarray]:
    """Names and reflectance [M, C] of the library's samples at `wavelengths_nm` (linear interpolation)."""
    samples = _library()
    wl = np.asarray(wavelengths_nm, dtype=np.float64)
    spectra = []
    for _, x, y in samples:
        order = np.argsort(x)
        spectra.append(np.interp(wl, x[order], y[order]))
    return [name for name, _, _ in samples], np.clip(np.stack(spectra), 0.0, 1.0)
