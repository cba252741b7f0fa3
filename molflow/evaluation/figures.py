"""Figures (PNG, matplotlib with the Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ramachandran(phi: np.ndarray, psi: np.ndarray, path: str | Path, title: str = "",
                 kT_kj_mol: float | None = None, bins: int = 64) -> Path:
    """Ramachandran plot of (phi, psi) in radians, as free energy -kT ln p (kJ/mol) if kT given."""
    plt = _plt()
    h, xe, ye = np.histogram2d(np.ravel(phi), np.ravel(psi), bins=bins, range=[[-np.pi, np.pi]] * 2,
                               density=True)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    if kT_kj_mol is not None:
        with np.errstate(divide="ignore"):
            f = -kT_kj_mol * np.log(h)
        f -= np.nanmin(f[np.isfinite(f)])
        im = ax.pcolormesh(np.degrees(xe), np.degrees(ye), np.ma.masked_invalid(np.where(np.isfinite(f), f, np.nan)).T,
                           cmap="viridis", shading="flat")
        fig.colorbar(im, ax=ax, label="free energy (kJ/mol)")
    else:
        im = ax.pcolormesh(np.degrees(xe), np.degrees(ye), h.T, cmap="viridis")
        fig.colorbar(im, ax=ax, label="density")
    ax.set_xlabel("φ (deg)")
    ax.set_ylabel("ψ (deg)")
    ax.set_xlim(-180, 180)
    ax.set_ylim(-180, 180)
    ax.set_xticks(range(-180, 181, 90))
    ax.set_yticks(range(-180, 181, 90))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
