"""Molecular systems: a PDB, force-field files and the Langevin settings.

A system is everything the engine needs to simulate one molecule: the OpenMM topology and
single-molecule ``System`` (NoCutoff, no constraints, no centre-of-mass motion remover), masses
(amu), temperature (K), friction (1/ps), timestep (fs) and the force-field files. Built-in systems
live in the repository's ``systems/`` folder (``systems/<name>/system.yaml`` + a PDB); any PDB path
of a capped or zwitterionic peptide works with the default force field.

    >>> from molflow import load_system
    >>> system = load_system("alanine_dipeptide")
    >>> system.n_atoms
    22
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .errors import InputError

DEFAULT_FORCEFIELD: tuple[str, ...] = ("amber99sbildn.xml", "amber99_obc.xml")
DEFAULT_SETTINGS: dict[str, float] = {
    "temperature_K": 300.0,
    "friction_per_ps": 1.0,
    "timestep_fs": 1.0,
}
#: Force classes the engine knows how to replicate into a multi-copy System.
SUPPORTED_FORCES = frozenset(
    {
        "HarmonicBondForce",
        "HarmonicAngleForce",
        "PeriodicTorsionForce",
        "NonbondedForce",
        "GBSAOBCForce",
        "CustomGBForce",
        "CMAPTorsionForce",
        "CustomTorsionForce",
    }
)
OVERRIDABLE = ("temperature_K", "friction_per_ps", "timestep_fs", "forcefield")


def systems_dir() -> Path:
    """The folder holding the built-in systems (``$MOLFLOW_SYSTEMS`` overrides it)."""
    env = os.environ.get("MOLFLOW_SYSTEMS")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent / "systems"  # source checkout / editable install
    if checkout.is_dir():
        return checkout
    import sys

    return Path(sys.prefix) / "share" / "molflow" / "systems"  # wheel install (pyproject data-files)


def builtin_systems() -> list[str]:
    """Names of the built-in systems (folders of ``systems/`` with a ``system.yaml``)."""
    root = systems_dir()
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob("*/system.yaml"))


def topology_terms(bonds: np.ndarray, n_atoms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bonds (nb, 2), angles (na, 3), proper dihedrals (nd, 4)) atom indices from the bond graph."""
    bonds = np.asarray(bonds, dtype=int).reshape(-1, 2)
    nbr: list[set[int]] = [set() for _ in range(n_atoms)]
    for a, b in bonds:
        nbr[a].add(b)
        nbr[b].add(a)
    angles = [(i, j, k) for j in range(n_atoms) for i in sorted(nbr[j]) for k in sorted(nbr[j]) if i < k]
    dihedrals = [(i, j, k, l) for j, k in bonds for i in sorted(nbr[j] - {k}) for l in sorted(nbr[k] - {j, i})]
    return bonds, np.array(angles, dtype=int).reshape(-1, 3), np.array(dihedrals, dtype=int).reshape(-1, 4)


@dataclasses.dataclass
class MolecularSystem:
    """One molecule and its simulation settings.

    Attributes
    ----------
    name: system name (built-in name or the PDB file's stem).
    pdb_text: the PDB text of one molecule (recorded in every output file).
    topology: OpenMM ``Topology`` of one molecule.
    positions_nm: (A, 3) reference coordinates in nm.
    forcefield_files: OpenMM force-field XML files.
    temperature_K, friction_per_ps, timestep_fs: Langevin settings.
    system: single-molecule OpenMM ``System`` (NoCutoff, no constraints, no CMMotionRemover).
    masses_amu: (A,) atomic masses in amu.
    """

    name: str
    pdb_text: str
    topology: Any
    positions_nm: np.ndarray
    forcefield_files: tuple[str, ...]
    temperature_K: float
    friction_per_ps: float
    timestep_fs: float
    system: Any
    masses_amu: np.ndarray
    description: str = ""

    @property
    def n_atoms(self) -> int:
        return int(self.positions_nm.shape[0])

    @property
    def kT_kj_mol(self) -> float:
        """Thermal energy k_B T in kJ/mol."""
        from .units import BOLTZMANN_KJ_MOL_K

        return float(BOLTZMANN_KJ_MOL_K * self.temperature_K)

    @property
    def elements(self) -> list[str]:
        return [a.element.symbol if a.element is not None else "X" for a in self.topology.atoms()]

    @property
    def heavy_atoms(self) -> np.ndarray:
        """Indices of non-hydrogen atoms."""
        return np.array([i for i, e in enumerate(self.elements) if e != "H"], dtype=int)

    @property
    def bonds(self) -> np.ndarray:
        """(n_bonds, 2) atom index pairs from the topology."""
        return np.array([(b[0].index, b[1].index) for b in self.topology.bonds()], dtype=int)

    @property
    def angles(self) -> np.ndarray:
        """(n_angles, 3) bond angles (i, j, k), vertex j, from the bond graph."""
        return topology_terms(self.bonds, self.n_atoms)[1]

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "system_name": self.name,
            "forcefield": list(self.forcefield_files),
            "temperature_K": float(self.temperature_K),
            "friction_per_ps": float(self.friction_per_ps),
            "timestep_fs": float(self.timestep_fs),
        }

    @property
    def fingerprint(self) -> str:
        """sha256 of what defines the physics: atoms and bonds, force field and settings."""
        h = hashlib.sha256()
        for atom in self.topology.atoms():
            h.update(f"{atom.residue.name}:{atom.name};".encode())
        for a, b in self.bonds:
            h.update(f"{a}-{b};".encode())
        h.update(repr(sorted(self.settings.items())).encode())
        return h.hexdigest()[:16]

    def create_system(self, nonbonded: str = "nocutoff", cutoff_nm: float = 1.5, topology=None):
        """A fresh OpenMM ``System`` for this molecule (or for ``topology``, e.g. many copies).

        ``nonbonded="nocutoff"`` gives the reference single-molecule system; ``"cutoff"`` a
        non-periodic cutoff at ``cutoff_nm`` with plain truncated Coulomb (reaction-field
        dielectric 1), used for non-interacting multi-copy systems (DESIGN.md section 4).
        """
        return _create_system(
            _load_forcefield(self.forcefield_files),
            topology if topology is not None else self.topology,
            nonbonded,
            cutoff_nm,
        )

    def dihedral_indices(self) -> dict[str, np.ndarray]:
        """Backbone phi/psi atom quadruples per residue, from the topology (0-based).

        Returns ``{"phi": (n, 4), "psi": (n, 4), "residues": [...]}`` for residues that have both.
        """
        atoms = list(self.topology.atoms())
        by_res: dict[int, dict[str, int]] = {}
        for a in atoms:
            by_res.setdefault(a.residue.index, {})[a.name] = a.index
        residues = list(self.topology.residues())
        phi, psi, names = [], [], []
        for i, res in enumerate(residues):
            cur = by_res[res.index]
            if not all(k in cur for k in ("N", "CA", "C")):
                continue
            prev = by_res[residues[i - 1].index] if i > 0 else {}
            nxt = by_res[residues[i + 1].index] if i + 1 < len(residues) else {}
            if "C" in prev and "N" in nxt:
                phi.append([prev["C"], cur["N"], cur["CA"], cur["C"]])
                psi.append([cur["N"], cur["CA"], cur["C"], nxt["N"]])
                names.append(f"{res.name}{res.id}")
        return {"phi": np.array(phi, dtype=int).reshape(-1, 4),
                "psi": np.array(psi, dtype=int).reshape(-1, 4), "residues": names}

    def backbone_torsions(self, which: str = "phi_psi") -> np.ndarray:
        """Backbone torsion quadruples (Q, 4). ``"phi_psi"``: phi and psi of every residue that has
        both (:meth:`dihedral_indices`). ``"backbone"``: every proper dihedral of the topology about
        those bonds (N-CA, CA-C), i.e. also those of the atoms that must turn with them (O, CB, HA, H).

        Used by training's ``torsion_weight``/``torsion_set`` and the finish's torsion hold. Measured on
        the shipped map's phase 2 (issue 17; benchmarks/one_jump_torsions.py, free-running one-jump
        spread map/MD at 0.5 ps with the 60-step finish / without): scoring "phi_psi" widened psi to
        0.29 / 0.57 (the finish undoes half: the map moved psi partly by straining the one atom that
        defines it); "backbone" to 0.44 / 0.56, but free-running (32 x 0.8 ns) it put 8% in alpha_L
        (MD 0.2%) and the energy at +5.3 kJ/mol against 3% and +3.4 with "phi_psi", which ships."""
        if which not in ("phi_psi", "backbone"):
            raise InputError(f"torsion_set must be 'phi_psi' or 'backbone', not {which!r}")
        d = self.dihedral_indices()
        phi_psi = np.asarray([*d["phi"], *d["psi"]], dtype=np.int64).reshape(-1, 4)
        if which == "phi_psi":
            return phi_psi
        centres = {frozenset(map(int, q[1:3])) for q in phi_psi}
        dih = np.asarray(topology_terms(self.bonds, self.n_atoms)[2], dtype=np.int64).reshape(-1, 4)
        return dih[[frozenset(map(int, q[1:3])) in centres for q in dih]]

    def central_dihedrals(self) -> tuple[np.ndarray, np.ndarray]:
        """The central residue's (phi, psi) quadruples (alanine dipeptide: (4,6,8,14), (6,8,14,16))."""
        d = self.dihedral_indices()
        if len(d["phi"]) == 0:
            raise InputError(f"system {self.name!r} has no backbone phi/psi dihedral")
        c = (len(d["phi"]) - 1) // 2
        return d["phi"][c], d["psi"][c]


# ----------------------------------------------------------------------------- loading


def load_system(name_or_pdb: str | os.PathLike, **overrides: Any) -> MolecularSystem:
    """Load a built-in system by name or any peptide PDB file.

    Parameters
    ----------
    name_or_pdb:
        a built-in name (see :func:`builtin_systems`), a folder with ``system.yaml``, or a PDB path.
    overrides:
        ``temperature_K``, ``friction_per_ps``, ``timestep_fs``, ``forcefield`` (list of XML files).

    Raises
    ------
    InputError
        with a message naming the problem: missing file, unparsable PDB, missing hydrogens,
        a residue without a template, an unsupported force-field file or force.
    """
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise InputError(f"unknown system setting(s) {sorted(unknown)}; allowed: {list(OVERRIDABLE)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    spec: dict[str, Any] = {}
    text = str(name_or_pdb)
    path = Path(text)
    builtin = systems_dir() / text / "system.yaml"
    if "/" not in text and not text.lower().endswith(".pdb") and builtin.is_file():
        spec, pdb_path = _read_spec(builtin)
    elif path.is_dir() and (path / "system.yaml").is_file():
        spec, pdb_path = _read_spec(path / "system.yaml")
    elif path.is_file():
        pdb_path = path
        spec = {"name": path.stem}
    else:
        names = ", ".join(builtin_systems()) or "none found"
        raise InputError(f"no such system or PDB file: {text!r} (built-in systems: {names})")

    settings = {**DEFAULT_SETTINGS, **{k: spec[k] for k in DEFAULT_SETTINGS if k in spec}}
    ff_files = tuple(spec.get("forcefield", DEFAULT_FORCEFIELD))
    for key in DEFAULT_SETTINGS:
        if key in overrides:
            settings[key] = float(overrides[key])
    if "forcefield" in overrides:
        ff = overrides["forcefield"]
        ff_files = tuple([ff] if isinstance(ff, str) else ff)
    for key, value in settings.items():
        if not np.isfinite(value) or value <= 0:
            raise InputError(f"{key} must be a positive number, got {value}")

    pdb_text = _read_text(pdb_path)
    topology, positions = _parse_pdb(pdb_text, pdb_path)
    forcefield = _load_forcefield(ff_files)
    _check_templates(forcefield, topology, pdb_path)
    system = _create_system(forcefield, topology, "nocutoff", 1.5)
    masses = np.array([system.getParticleMass(i)._value for i in range(system.getNumParticles())])
    if np.any(masses <= 0):
        raise InputError(f"{pdb_path}: massless particles (virtual sites) are not supported")
    return MolecularSystem(
        name=str(spec.get("name", Path(pdb_path).stem)),
        pdb_text=pdb_text,
        topology=topology,
        positions_nm=positions,
        forcefield_files=ff_files,
        system=system,
        masses_amu=masses,
        description=str(spec.get("description", "")),
        **settings,
    )


def system_from_pdb_text(pdb_text: str, forcefield_files, temperature_K: float,
                         friction_per_ps: float, timestep_fs: float, name: str) -> MolecularSystem:
    """Rebuild a system from what an output file or checkpoint records (PDB text + settings)."""
    topology, positions = _parse_pdb(pdb_text, name)
    forcefield = _load_forcefield(tuple(forcefield_files))
    system = _create_system(forcefield, topology, "nocutoff", 1.5)
    masses = np.array([system.getParticleMass(i)._value for i in range(system.getNumParticles())])
    return MolecularSystem(name=name, pdb_text=pdb_text, topology=topology, positions_nm=positions,
                           forcefield_files=tuple(forcefield_files), temperature_K=float(temperature_K),
                           friction_per_ps=float(friction_per_ps), timestep_fs=float(timestep_fs),
                           system=system, masses_amu=masses)


def _read_spec(yaml_path: Path) -> tuple[dict[str, Any], Path]:
    try:
        spec = yaml.safe_load(yaml_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{yaml_path}: not valid YAML ({exc})") from None
    pdb = yaml_path.parent / spec.get("pdb", "structure.pdb")
    spec.setdefault("name", yaml_path.parent.name)
    return spec, pdb


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise InputError(f"PDB file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read PDB file {path}: {exc}") from None


def _parse_pdb(pdb_text: str, origin) -> tuple[Any, np.ndarray]:
    from openmm import app

    if not any(line.startswith(("ATOM", "HETATM")) for line in pdb_text.splitlines()):
        raise InputError(f"{origin}: not a PDB file (no ATOM/HETATM records)")
    try:
        pdb = app.PDBFile(io.StringIO(pdb_text))
    except Exception as exc:  # OpenMM raises bare Exceptions/ValueErrors for many defects
        raise InputError(f"{origin}: could not parse PDB ({type(exc).__name__}: {exc})") from None
    positions = np.array(pdb.getPositions(asNumpy=True)._value, dtype=np.float64)
    if positions.shape[0] == 0:
        raise InputError(f"{origin}: the PDB has no atoms")
    if not np.all(np.isfinite(positions)):
        raise InputError(f"{origin}: the PDB has non-finite coordinates")
    if pdb.topology.getNumChains() > 1:
        raise InputError(f"{origin}: one molecule per PDB please (found {pdb.topology.getNumChains()} chains)")
    return pdb.topology, positions


_FORCEFIELDS: dict[tuple, Any] = {}


def _load_forcefield(files: tuple[str, ...]):
    """An OpenMM ForceField, parsed once per process (parsing amber99sbildn takes ~0.3 s, and a run
    builds several systems; a shard of a Dask run builds them in every task). Keyed by the files'
    modification times too, so an edited XML file is read again."""
    from openmm import app

    for f in files:
        if not str(f).endswith(".xml"):
            raise InputError(f"unsupported force-field file {f!r}: OpenMM XML force fields only")
    key = tuple((str(f), os.path.getmtime(f) if os.path.exists(f) else None) for f in files)
    if key not in _FORCEFIELDS:
        try:
            _FORCEFIELDS[key] = app.ForceField(*files)
        except Exception as exc:
            raise InputError(f"cannot load force field {list(files)}: {exc}") from None
    return _FORCEFIELDS[key]


def _known_residue_names(forcefield) -> set[str]:
    """Residue names the force field or OpenMM's PDB reader knows (templates, their N/C-terminal
    variants, and the standard residues whose bonds the PDB reader adds, e.g. HIS)."""
    from openmm import app

    names = set(getattr(forcefield, "_templates", {}))
    names |= {n[1:] for n in names if n[:1] in ("N", "C") and len(n) == 4}
    names |= set(getattr(app.Topology, "_standardBonds", {}))
    return names


def _check_templates(forcefield, topology, origin) -> None:
    """Refuse a topology with residues the force field has no template for, naming them first.

    Missing hydrogens are only suggested after the residues are named: an unknown residue name
    (say XYZ) is not cured by adding hydrogens.
    """
    unmatched = forcefield.getUnmatchedResidues(topology)
    if not unmatched:
        return
    names = ", ".join(f"{r.name}{r.id}" for r in unmatched)
    msg = f"{origin}: residue(s) {names} match no template of the force field"
    known = _known_residue_names(forcefield)
    unknown = sorted({r.name for r in unmatched if r.name not in known}) if known else []
    if unknown:
        msg += (f"; {', '.join(unknown)} is not a residue name the force field knows (rename it to a "
                "standard residue, or add a template / force-field file for it)")
    n_h = sum(1 for a in topology.atoms() if a.element is not None and a.element.symbol == "H")
    if n_h == 0:
        msg += ("; the structure also has no hydrogens: add them, e.g. "
                "openmm.app.Modeller(top, pos).addHydrogens(forcefield) or pdbfixer")
    elif not unknown:
        msg += " (missing or extra atoms, or missing hydrogens)"
    raise InputError(msg)


def _create_system(forcefield, topology, nonbonded: str, cutoff_nm: float):
    import openmm
    from openmm import app, unit

    method = {"nocutoff": app.NoCutoff, "cutoff": app.CutoffNonPeriodic}[nonbonded]
    kwargs = {"nonbondedCutoff": cutoff_nm * unit.nanometer} if nonbonded == "cutoff" else {}
    try:
        system = forcefield.createSystem(
            topology, nonbondedMethod=method, constraints=None, rigidWater=False,
            removeCMMotion=False, **kwargs,
        )
    except Exception as exc:
        raise InputError(f"force field cannot build a system: {exc}") from None
    for force in system.getForces():
        kind = type(force).__name__
        if kind not in SUPPORTED_FORCES:
            raise InputError(f"unsupported force {kind} (supported: {sorted(SUPPORTED_FORCES)})")
        if isinstance(force, openmm.NonbondedForce) and nonbonded == "cutoff":
            force.setReactionFieldDielectric(1.0)
            force.setUseDispersionCorrection(False)
    return system
