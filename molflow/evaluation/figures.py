"""Figures (PNG files drawn on matplotlib ``Figure`` objects: no display, no backend switch, nothing
registered with pyplot, so a Jupyter session's own plots keep working after ``molflow.evaluate``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


class _Figures:
    """The two pyplot calls this module needs, on bare ``matplotlib.figure.Figure`` objects."""

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, figsize=None, **kwargs):
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(nrows, ncols, **kwargs)

    @staticmethod
    def close(fig) -> None:  # not registered with pyplot: nothing to release
        pass


def _plt() -> _Figures:
    return _Figures()


def _save(fig, path: Path, paths: list[Path] | None = None, dpi: int = 110) -> Path:
    """Lay out, write and close a figure; append its path to ``paths``."""
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    if paths is not None:
        paths.append(Path(path))
    return Path(path)


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
    return _save(fig, Path(path), dpi=120)


def evaluation_figures(ref, smp, result: dict, system, out_dir: Path) -> list[Path]:
    """The evaluator's PNGs: Ramachandran (reference | samples | difference), 1-D free energies,
    autocorrelations and implied timescales. Returns the paths written."""
    from . import metrics as M

    plt = _plt()
    kT = system.kT_kj_mol
    out_dir = Path(out_dir)
    paths = []
    # Ramachandran side by side
    p_ref = M.phi_psi_histogram(ref.phi.ravel(), ref.psi.ravel())
    p_s = M.phi_psi_histogram(smp.phi.ravel(), smp.psi.ravel())
    f_ref, f_s = M.free_energy(p_ref, kT), M.free_energy(p_s, kT)
    edges = np.linspace(-180, 180, p_ref.shape[0] + 1)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    vmax = np.nanpercentile(np.concatenate([f_ref[np.isfinite(f_ref)], f_s[np.isfinite(f_s)]]), 99)
    for ax, f, title in ((axes[0], f_ref, "reference"), (axes[1], f_s, "samples")):
        im = ax.pcolormesh(edges, edges, np.ma.masked_invalid(f).T, cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"{title}: F (kJ/mol)")
        fig.colorbar(im, ax=ax)
    diff = f_s - f_ref
    if np.isfinite(diff).any():  # no common bin (e.g. disjoint distributions): nothing to centre
        diff -= np.nanmean(diff)
    lim = np.nanpercentile(np.abs(diff), 95) if np.isfinite(diff).any() else 1.0
    im = axes[2].pcolormesh(edges, edges, np.ma.masked_invalid(diff).T, cmap="RdBu_r", vmin=-lim, vmax=lim)
    axes[2].set_title("samples - reference (kJ/mol)")
    fig.colorbar(im, ax=axes[2])
    for ax in axes:
        ax.set_xlabel("φ (deg)")
        ax.set_ylabel("ψ (deg)")
    fig.suptitle(f"JS(φ,ψ) = {result['stationary']['js_phi_psi']:.3g}")
    _save(fig, out_dir / "ramachandran.png", paths)
    # 1-D free-energy profiles
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    bins = np.linspace(-np.pi, np.pi, 65)
    centres = np.degrees(0.5 * (bins[1:] + bins[:-1]))
    for ax, name in zip(axes, ("phi", "psi")):
        for run, style in ((ref, "k-"), (smp, "C1--")):
            h, _ = np.histogram(getattr(run, name).ravel(), bins=bins, density=True)
            with np.errstate(divide="ignore"):
                f = -kT * np.log(h)
            ax.plot(centres, f - np.nanmin(f[np.isfinite(f)]), style, label=run.label)
        ax.set_xlabel(f"{'φ' if name == 'phi' else 'ψ'} (deg)")
        ax.set_ylabel("F (kJ/mol)")
        ax.legend()
    _save(fig, out_dir / "free_energy_1d.png", paths)
    # autocorrelations
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("autocorr_phi", "autocorr_psi")):
        for who, style in (("reference", "k-"), ("samples", "C1o--")):
            ac = result["kinetics"][who][key]
            ax.plot(ac["lag_ps"], ac["value"], style, label=who, markersize=3)
        ax.set_xlabel("lag (ps)")
        ax.set_ylabel(key.replace("_", " "))
        ax.legend()
    _save(fig, out_dir / "autocorrelation.png", paths)
    # implied timescales
    its = {w: result["kinetics"][w].get("implied_timescale_ns") or {} for w in ("reference", "samples")}
    if any(v.get("timescales_ns") for v in its.values()):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for who, style in (("reference", "k-o"), ("samples", "C1--s")):
            v = its[who]
            if v.get("timescales_ns"):
                ts = np.array([t[0] if t else np.nan for t in v["timescales_ns"]])
                ax.plot(v["lags_ps"], ts, style, label=f"{who}, slowest")
        ax.set_xlabel("lag (ps)")
        ax.set_ylabel("implied timescale (ns)")
        ax.set_yscale("log")
        ax.legend()
        _save(fig, out_dir / "implied_timescales.png", paths)
    # strong error vs jumps (pathwise samples only)
    pw = result.get("pathwise") or {}
    if pw.get("jumps"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        t = np.asarray(pw["time_ps"])
        for key, label in (("heavy_rmsd_raw_nm", "heavy RMSD raw"), ("heavy_rmsd_aligned_nm", "heavy RMSD aligned")):
            axes[0].errorbar(t, _arr(pw["strong_error_" + key]), yerr=_arr(pw.get("strong_error_" + key + "_se")),
                             fmt="o-", ms=3, label=label)
        for key, label in (("dphi_deg", "Δφ"), ("dpsi_deg", "Δψ")):
            axes[1].errorbar(t, _arr(pw["strong_error_" + key]), yerr=_arr(pw.get("strong_error_" + key + "_se")),
                             fmt="o-", ms=3, label=label)
        axes[0].set_ylabel("RMS error (nm)")
        axes[1].set_ylabel("RMS error (deg)")
        for ax in axes:
            ax.set_xlabel(f"time (ps) = jumps x {pw['time_ps'][0]:g} ps")
            ax.legend()
        fig.suptitle(f"strong error vs jumps ({pw.get('mode')} mode, {pw['n_replicas']} replicas)")
        _save(fig, out_dir / "strong_error.png", paths)
    return paths


def _arr(values) -> np.ndarray | None:
    if values is None:
        return None
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def iid_figures(ref, phi: np.ndarray, psi: np.ndarray, weights: np.ndarray | None, result: dict, system,
                out_dir: Path) -> list[Path]:
    """Figures for i.i.d. conformations: Ramachandran free energies (reference | samples | samples
    weighted), 1-D free energies, and the weight distribution. Returns the paths written."""
    from . import metrics as M

    plt = _plt()
    kT = system.kT_kj_mol
    out_dir = Path(out_dir)
    paths: list[Path] = []
    panels = [("reference MD", ref.phi.ravel(), ref.psi.ravel(), None),
              ("samples, unweighted", phi, psi, None)]
    if weights is not None and np.nansum(weights) > 0:
        panels.append(("samples, Boltzmann-weighted", phi, psi, weights))
    fs = [M.free_energy(M.phi_psi_histogram(a, b, w), kT) for _, a, b, w in panels]
    finite = np.concatenate([f[np.isfinite(f)] for f in fs if np.isfinite(f).any()])
    vmax = np.nanpercentile(finite, 99) if finite.size else 1.0
    edges = np.linspace(-180, 180, fs[0].shape[0] + 1)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4))
    for ax, (title, *_), f in zip(np.atleast_1d(axes), panels, fs):
        im = ax.pcolormesh(edges, edges, np.ma.masked_invalid(f).T, cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"{title}: F (kJ/mol)", fontsize=10)
        ax.set_xlabel("φ (deg)")
        ax.set_ylabel("ψ (deg)")
        fig.colorbar(im, ax=ax)
    _save(fig, out_dir / "ramachandran.png", paths)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    bins = np.linspace(-np.pi, np.pi, 65)
    centres = np.degrees(0.5 * (bins[1:] + bins[:-1]))
    for ax, k in zip(axes, (0, 1)):
        for (title, a, b, w), style in zip(panels, ("k-", "C1--", "C2-")):
            h, _ = np.histogram((a, b)[k], bins=bins, weights=w, density=True)
            with np.errstate(divide="ignore"):
                f = -kT * np.log(h)
            if np.isfinite(f).any():
                ax.plot(centres, f - np.nanmin(f[np.isfinite(f)]), style, label=title)
        ax.set_xlabel("φ (deg)" if k == 0 else "ψ (deg)")
        ax.set_ylabel("F (kJ/mol)")
        ax.legend(fontsize=8)
    _save(fig, out_dir / "free_energy_1d.png", paths)
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        n = w.size
        pos = w[w > 0]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        if pos.size:
            axes[0].hist(np.log10(pos * n), bins=50, color="C2")
        axes[0].set_xlabel("log10(N · w)  (1 = a uniform weight)")
        axes[0].set_ylabel("samples")
        axes[0].set_title(f"{n - pos.size} of {n} samples have weight 0", fontsize=10)
        srt = np.sort(w)[::-1]
        axes[1].plot(np.arange(1, n + 1), np.cumsum(srt), "C2-")
        axes[1].set_xscale("log")
        axes[1].set_xlabel("samples, largest weight first")
        axes[1].set_ylabel("cumulative weight")
        ess = result.get("weights", {}).get("ess")
        axes[1].set_title(f"Kish ESS {ess:.3g} of {n}" if ess is not None else "", fontsize=10)
        _save(fig, out_dir / "weights.png", paths)
    return paths
